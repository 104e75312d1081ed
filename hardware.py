"""Where and how the network runs: the device, the precision (bf16 autocast or fp32), the memory layout of the
activations (NCHW or NHWC), the timed speed probe that chooses the fastest of them and its cache, and compilation.

    python hardware.py           # prints the device that --device auto picks, and whether it has fast bf16

improved-diffusion keeps these apart from the diffusion math in the same way (`dist_util.py`, `fp16_util.py`):
`unet.py` is the network, `noise_scheduler.py` the math, and the scripts ask this module how to run them.
`setup_distributed` gives each process that torchrun starts its device and its process group, and `on_rank_0` runs
what rank 0 does alone while the others wait for it; `from_rank_0`, `from_every_rank` and `max_over_ranks` are the
collectives training.py needs, `launch_id` names the torchrun launch a process belongs to, and `StopRequest` turns
Ctrl-C and SIGTERM into a flag that training.py checks after each step.
"""
import contextlib
import datetime
import json
import math
import os
import re
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from cli import atomic_write, first_line

try:
    import fcntl  # the probe cache's lock (POSIX)
except ImportError:
    fcntl = None


# ---- devices and precision ---------------------------------------------------------------------
def pick_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; anything else must be available or it raises ValueError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for, but PyTorch sees no CUDA GPU on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name} was asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps was asked for, but MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


# A process of a torchrun run that stops answering (dead, stopped, deadlocked, on a lost host) makes the others fail
# after this long without progress in a collective, instead of gloo's 30 minutes (NCCL's 10), so that torchrun,
# which only watches exit codes, restarts the run.  Inside a collective the processes wait only for each other's
# step (seconds; the first step's compilation with --compile); what rank 0 does alone (the speed probe, a checkpoint
# write, a sample grid, an FID measurement) others wait for in on_rank_0, however long it takes while rank 0 lives.
DIST_TIMEOUT_MINUTES = 5.0
HEARTBEAT_SECONDS = 1.0               # how often rank 0 says it lives while it works alone (on_rank_0)
_group = {}                           # this process's store (its attempt's namespace), timeout and on_rank_0 calls


def setup_distributed(device_name, timeout_minutes=DIST_TIMEOUT_MINUTES):
    """(rank, world_size, device).  torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; a plain run is rank 0 of 1.
    The process group's collectives fail after `timeout_minutes` without progress.  Its keys go into a namespace
    of this torchrun attempt (TORCHELASTIC_RESTART_COUNT): torchrun's agent serves one TCPStore, at the same
    MASTER_PORT, to every attempt of a launch, and without it a restarted process could read the address that its
    peer published in the attempt before, a closed port ("Gloo connectFullMesh failed ... Connection refused").
    (The count is the same on every node as long as the whole group restarts together, as torchrun does.)"""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, pick_device(device_name)
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(minutes=timeout_minutes)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)      # else rank 0 serves it
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_store, timeout=timeout, multi_tenant=True)
    store = dist.PrefixStore(f"ddpm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                            timeout=timeout)
    _group.update(store=store, timeout=timeout, calls=0)
    return rank, world, device


class PeerLost(Exception):
    """Another process of the run stopped answering: the message says which and how long it was waited for."""


def peer_lost(error):
    """Whether an exception raised under torchrun says that another process died or stopped answering: PeerLost, or
    a collective that timed out or lost its connection (gloo raises a plain RuntimeError naming itself)."""
    if isinstance(error, (PeerLost, dist.DistError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and dist.is_initialized() and (
        "gloo" in text or "NCCL" in text or "Timed out" in text or "Connection" in text)


def exit_peer_lost(error):
    """After peer_lost(error): say in one line that this process lost the run's other processes, and why, and exit 1,
    so that torchrun --max-restarts can restart the run from its last checkpoint."""
    reason = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error)).split(". ")[0]   # gloo's: [its source file] what. more
    print(f"error: process {os.environ.get('RANK', 0)} lost the run's other processes ({reason}); it exits 1, so "
          f"that torchrun --max-restarts can restart the run from its last checkpoint", file=sys.stderr)
    sys.exit(1)


def on_rank_0(work):
    """work() on rank 0 alone while the other processes wait for it: its result on rank 0, None elsewhere (and
    work() itself in a run of one process, or outside setup_distributed's process group).  An FID
    measurement or a large grid may take longer than the process group's timeout, so the others do not wait in a
    collective: rank 0 beats a heartbeat into the store every HEARTBEAT_SECONDS while it works, and a waiting process
    raises PeerLost only when no beat came for the timeout (rank 0 died, stopped, or lost its host; one alive but
    stuck inside work() is not seen here).  If work() fails on rank 0 (an exception, or cli.fail's exit), the
    others exit 1 without a word of their own, rank 0 having said why."""
    if not (dist.is_initialized() and "store" in _group):
        return work()
    store, timeout = _group["store"], _group["timeout"].total_seconds()
    _group["calls"] += 1
    key = f"rank0_work_{_group['calls']}"
    if dist.get_rank() == 0:
        done = threading.Event()

        def beat():
            n = 0
            try:
                while True:
                    store.set(f"{key}/beat", str(n))
                    n += 1
                    if done.wait(HEARTBEAT_SECONDS):
                        return
            except (RuntimeError, ValueError):          # the store is gone: the waiting processes will say so
                return
        heart = threading.Thread(target=beat, daemon=True)
        heart.start()
        outcome = "failed"
        try:
            result = work()
            outcome = "done"
            return result
        finally:
            done.set()
            heart.join()
            store.set(f"{key}/end", outcome)
    last, heard, looked = None, time.monotonic(), 0.0
    while not store.check([f"{key}/end"]):    # (store.wait would log a warning at each of its timeouts)
        time.sleep(0.02)
        if time.monotonic() - looked < HEARTBEAT_SECONDS:
            continue
        looked = time.monotonic()                          # has rank 0 beaten since?
        beat = store.get(f"{key}/beat") if store.check([f"{key}/beat"]) else None
        if beat != last:
            last, heard = beat, looked
        elif looked - heard > timeout:
            raise PeerLost(f"process 0 has not been heard from for {timeout / 60:g} minutes (--dist-timeout) "
                           f"while the others waited for it")
    if store.get(f"{key}/end") != b"done":
        raise SystemExit(1)
    return None


def from_rank_0(values, world):
    """The list `values` as rank 0 holds it, on every process (filled in place): what rank 0 decided alone, which
    the others wait for.  In a run of one process, `values` as it is."""
    if world > 1:
        dist.broadcast_object_list(values, src=0)
    return values


def from_every_rank(value, world):
    """[rank 0's value, rank 1's, ...] on every process; [value] in a run of one process."""
    if world == 1:
        return [value]
    values = [None] * world
    dist.all_gather_object(values, value)
    return values


def max_over_ranks(values, device):
    """Each of the numbers `values` at its largest over the processes, as a float64 tensor on every process: a flag
    (False, True) that any process raised, or minus a count whose least the processes take."""
    values = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def leave_process_group(world):
    """At the end of a torchrun run, leave its process group (a run of one process has none)."""
    if world > 1:
        dist.destroy_process_group()


def launch_id():
    """The torchrun launch this process belongs to, the same in every attempt of it and in no other launch, or None
    outside torchrun.  TORCHELASTIC_RUN_ID is torchrun's rendezvous id: a new UUID for every launch with
    --standalone (and on one node without --master-port); where it is torchrun's default "none" (--rdzv-backend
    static: --master-port, or several nodes without --rdzv-id), the launch is its agent process, which stays
    the same over the restarts: the parent process, by the machine's boot, its PID and its start time."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None or run_id != "none":
        return run_id
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        with open(f"/proc/{os.getppid()}/stat") as f:
            started = f.read().rsplit(")", 1)[1].split()[19]       # field 22: the start time, in clock ticks
    except (OSError, IndexError):
        return None
    return f"agent {boot} {os.getppid()} {started}"


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag the training loop checks after each step, so a step and a
    checkpoint write are never cut in half.  Further signals while saving are only noted."""

    def __init__(self):
        self.signum = None
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum is None:
            print(f"\n{signal.Signals(signum).name} received: finishing this step and saving the checkpoint...",
                  file=sys.stderr, flush=True)
        self.signum = self.signum or signum

    def ignore_further(self):
        """Once the checkpoint is saved: ignore further signals.  Python restores the default handlers while
        it shuts down, so one more Ctrl-C then would kill the process (exit -2) instead of ending it with 130."""
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)

    def exit_code(self):
        """The exit code of a run the signal stopped: 128 + its number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + (self.signum or signal.SIGTERM)


def describe_device(device):
    """'Intel(R) Xeon(R) Processor, 2 threads' on a CPU, the GPU's name on CUDA: the machine a figure was
    measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = device.type
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"{name}, {threads} thread{'s' if threads > 1 else ''}"


def bf16_supported(device):
    """Whether bfloat16 autocast is fast on this device (native bf16 matrix instructions)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def resolve_precision(precision, device):
    """The precision of a task that is not timed by `choose_speed`: a forced one as given; 'auto' -> bf16 where
    the device has native bf16 matrix instructions, else fp32."""
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; use auto, bf16 or fp32")
    return precision


def autocast(device, precision):
    """bf16 autocast for the network; the diffusion math around it stays in float32."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format(device):
    """The layout of the activations when it is not measured (`choose_speed` measures it on a CPU): NHWC
    ("channels_last") on a GPU, whose tensor cores read it natively, else NCHW.  Converting the weights is
    enough: a convolution with NHWC weights returns NHWC activations, and the layers after it keep them."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


LAYOUT_NAMES = {torch.contiguous_format: "NCHW", torch.channels_last: "NHWC"}
LAYOUT_NAMES_INV = {name: layout for layout, name in LAYOUT_NAMES.items()}


def synchronize(device):
    """Wait for the device's queued work, so that a clock read after it measures that work (GPUs run ahead)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Timed calls of each candidate in the speed probe.  With one call each, a burst of load on a noisy 2-core VM made a
# candidate look 2 to 3 times slower in 6 of 20 starts on an AMD EPYC, with three in none (the fastest two within 0.73).
PROBE_REPEATS = 3


def fastest(seconds):
    """The candidate that took the least time, from {candidate: seconds}."""
    return min(seconds, key=seconds.get)


def time_candidates(run, candidates, repeats=PROBE_REPEATS):
    """{candidate: seconds of one run(candidate)}: the least of `repeats` timed calls after an untimed warm-up.
    The candidates take turns, each round starting one candidate further on, so that a slow moment of a busy
    machine (another process, a neighbour on the VM's host) that spoils one call does not decide: it has to
    slow every call of the faster candidate, and none of the slower one's, to change the verdict."""
    best = {c: math.inf for c in candidates}
    for attempt in range(repeats + 1):
        shift = attempt % len(candidates)
        for c in candidates[shift:] + candidates[:shift]:
            start = time.perf_counter()
            run(c)
            if attempt:
                best[c] = min(best[c], time.perf_counter() - start)
    return best


def probe_cache_path():
    """Where verdicts of the speed probe are kept: $DDPM_CACHE_DIR, else ~/.cache/minimal-ddpm."""
    folder = os.environ.get("DDPM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "minimal-ddpm")
    return os.path.join(folder, "speed_probe.json")


def _read_probe_cache(path):
    """{key: verdict}; a file that is missing, unreadable or not such a table reads as empty."""
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _add_to_probe_cache(path, key, verdict):
    """Keep one verdict and return the one kept.  The file is read again under a lock, so that two runs probing
    at once add to it instead of writing over each other's verdicts: a lost verdict is timed again later, under
    other load, and two runs of one model could then choose different precisions.  Of two verdicts for one key,
    the first written stays, and both runs use it.  Best effort: a cache that cannot be written costs a probe
    next time, nothing more."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".lock", "a") as lock:
            if fcntl is not None:               # POSIX; elsewhere the re-read alone narrows the window
                fcntl.flock(lock, fcntl.LOCK_EX)
            cache = _read_probe_cache(path)
            if key not in cache:
                cache[key] = verdict
                atomic_write(path, lambda f: json.dump(cache, f, indent=1))
            return cache[key]
    except OSError:
        return verdict


PROBE_BATCH = {True: 16, False: 32}      # images per timed pass, training and sampling: the probe stays near 1 s


def choose_speed(model, device, precision="auto", training=False, batch_size=100, use_cache=True):
    """(precision, memory format, note): the fastest way to run `model` for this task on this device.

    A forced precision ('bf16', 'fp32') is used as given, with the default layout, and nothing is timed.
    'auto' times the real model on the real device for the real task: a forward pass (sampling) or a forward
    and backward pass (training) at up to PROBE_BATCH images, in fp32 and bf16 autocast (where the device has
    native bf16) and in NCHW and NHWC on a CPU, and picks the fastest.  A CPU's bf16 flag does not tell: on one
    Xeon with AVX-512 BF16 it sampled 2.2 times slower than fp32, on another with AMX it trained 1.7 times
    faster.  A CUDA GPU with bf16 is not timed: bf16 tensor cores in NHWC are the fast path there, and the probe
    would cost compilation and warm-up that few runs recover.  The verdict is kept in probe_cache_path(), per
    machine, threads, torch version, task, batch and model shape, so later runs start at once and two runs on
    one machine always agree; the random state of the caller is left as it was.
    """
    layout = memory_format(device)
    if precision != "auto":
        return resolve_precision(precision, device), layout, "forced"
    if device.type == "cuda" and bf16_supported(device):
        return "bf16", layout, "not timed: bf16 tensor cores"
    precisions = ["fp32", "bf16"] if bf16_supported(device) else ["fp32"]
    layouts = [torch.contiguous_format, torch.channels_last] if device.type == "cpu" else [layout]
    candidates = [(p, f) for p in precisions for f in layouts]
    if len(candidates) == 1:
        return precisions[0], layout, "the only candidate here"
    batch = min(batch_size, PROBE_BATCH[training])
    key = json.dumps([describe_device(device), torch.__version__, "training" if training else "sampling", batch,
                      type(model).__name__, [list(p.shape) for p in model.parameters()]])
    path = probe_cache_path()
    verdict = _read_probe_cache(path).get(key) if use_cache else None          # [[(precision, layout), seconds]]
    if verdict is not None:
        where = f"probe cached in {path}"
    else:
        start = time.perf_counter()
        timed = _probe(model, device, training, batch, candidates)
        where = f"probe took {time.perf_counter() - start:.1f} s"
        verdict = [[(p, LAYOUT_NAMES[f]), t] for (p, f), t in timed.items()]
        if use_cache:
            kept = _add_to_probe_cache(path, key, verdict)
            if kept is not verdict:
                where += f"; another run's verdict, cached in {path} meanwhile, kept"
            verdict = kept
    seconds = {(c[0], LAYOUT_NAMES_INV[c[1]]): t for c, t in verdict}
    best = fastest(seconds)
    others = ", ".join(f"{p} {LAYOUT_NAMES[f]} {seconds[best] / t:.2f}x"
                       for (p, f), t in seconds.items() if (p, f) != best)
    return best[0], best[1], f"measured: {others} as fast here; {where}"


def _probe(model, device, training, batch, candidates):
    """Seconds per pass of each (precision, layout) candidate; the model ends in its original layout, without
    gradients."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, model.in_channels, model.image_size, model.image_size, generator=g).to(device)
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        was_training = model.training
        model.train(training)

        def run(candidate):
            precision, layout = candidate
            model.to(memory_format=layout)
            with torch.set_grad_enabled(training), autocast(device, precision):
                out = model(x.contiguous(memory_format=layout), t)
            if training:
                out.float().square().mean().backward()
            synchronize(device)

        try:
            return time_candidates(run, candidates)
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
            model.to(memory_format=torch.contiguous_format)


def training_speed(model, device, precision_option, config, master, world):
    """(precision, memory layout, why) of the training steps.  --precision auto times the candidates on this model
    (choose_speed), on rank 0, which tells the other processes; a resumed run keeps the precision and
    layout it started with, so that it goes on bit for bit, unless a precision is forced."""
    if precision_option == "auto" and "precision" in config:
        return config["precision"], LAYOUT_NAMES_INV[config["memory_format"]], "as the run started"

    def probe():
        precision, layout, note = choose_speed(model, device, precision_option, training=True,
                                               batch_size=config["batch_size"] // world)
        return [precision, LAYOUT_NAMES[layout], note]
    decision = on_rank_0(probe) or [None, None, None]     # the others wait for it, however long it takes
    decision = from_rank_0(decision, world)
    return decision[0], LAYOUT_NAMES_INV[decision[1]], decision[2]


def on_device(images, labels, device):
    """Training images (uint8) and their labels on a CUDA device, when they are held in memory: the whole dataset
    lives on the GPU.  Elsewhere, or streamed from a folder, as they are."""
    if device.type == "cuda" and isinstance(images, torch.Tensor):
        images = images.to(device)
        labels = labels.to(device) if labels is not None else None
    return images, labels


def wrap_for_training(model, device, world, compile_model=False):
    """The model as the training steps call it: under torchrun in DistributedDataParallel, which averages the
    gradients over the processes, and with --compile through torch.compile (it compiles during the first steps)."""
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        model = torch.compile(model)
    return model


def compile_for_sampling(model, device):
    """torch.compile for the reverse process: on a GPU with CUDA graphs ("reduce-overhead"), so that the
    T small sequential steps are not bound by kernel launches.  The module's attributes stay reachable."""
    return torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else None)


if __name__ == "__main__":
    here = pick_device()
    print(f"--device auto: {here} ({describe_device(here)}); native bf16: {bf16_supported(here)}")
