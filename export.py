"""Export a training run's averaged (EMA) weights as one safetensors file, with the model's configuration.

    python export.py                                              # default/ddpm_ckpt.pth -> default/model.safetensors
    python export.py --ckpt runs/fm/ddpm_ckpt.pth --out fm.safetensors

The file holds the EMA state dict (the weights sampling.py and evaluate.py use) and, in its string metadata:
    format       SAFETENSORS_FORMAT ("ddpm-ema-v2")
    config       the whole training configuration, as JSON: the U-Net's shape, the noise schedule, the dataset,
                 the classes of a conditional model, ...
    prediction   what the network predicts ("eps" for checkpoints that do not say)
    ddpm_sha256  the SHA-256 of the whole file as written with these 64 digits as zeros (checkpoint.seal_safetensors),
                 which every load checks: safetensors itself has no checksum
    fit          what is fitted to these weights (UniPC's walk, the fitted sampler's costs), as JSON, if the
                 checkpoint holds it
    student      if distill.py distilled a student from these weights (student.pth beside the checkpoint): its
                 teacher's digest and how it was distilled, as JSON; its tensors are stored as "student.NAME"
No optimizer, random states or counters: it cannot be resumed, only sampled.  safetensors holds only tensors
and a JSON header, so loading it can run no code.  sampling.py --ckpt FILE.safetensors, evaluate.py --ckpt
FILE.safetensors and sampling.load_model("FILE.safetensors") draw exactly the images the checkpoint draws.
"""
import argparse
import json
import os

from checkpoint import (
    STUDENT_PREFIX,
    CheckpointError,
    checked_fit,
    load_checkpoint,
    read_safetensors,
    read_student,
    student_path,
    weights_digest,
    write_safetensors,
)
from cli import fail, first_line, logger, show_log
from run_folder import DEFAULT_CKPT, DEFAULT_OUT_DIR

DEFAULT_OUT = os.path.join(DEFAULT_OUT_DIR, "model.safetensors")
log = logger(__name__)


def export(ckpt_path, out_path):
    """Write the EMA weights and configuration of the checkpoint at ckpt_path to out_path (atomically).  Raises
    CheckpointError with one sentence for a missing or damaged checkpoint, or an output it cannot write."""
    ckpt = load_checkpoint(ckpt_path)
    config = ckpt["config"]
    metadata = {"config": json.dumps(config), "prediction": str(config.get("prediction", "eps"))}
    digest = weights_digest(ckpt["ema"])
    fit = checked_fit(ckpt.get("fit"), digest, ckpt_path)
    if fit is not None:
        metadata["fit"] = json.dumps(fit)
    weights = ckpt["ema"]
    student = read_student(ckpt_path)
    if student is not None and student["teacher"] == digest:
        metadata["student"] = json.dumps({"teacher": digest, "distill": student["distill"]})
        weights = {**weights, **{STUDENT_PREFIX + name: value for name, value in student["student"].items()}}
    elif student is not None:
        log.warning(f"note: {student_path(ckpt_path)} was distilled from other weights, so it is not exported")
    try:
        write_safetensors(weights, metadata, out_path)
    except OSError as e:
        raise CheckpointError(f"could not write {out_path} ({getattr(e, 'strerror', None) or first_line(e)})") from None


def build_parser():
    p = argparse.ArgumentParser(description="Export a checkpoint's EMA weights and configuration as safetensors.")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help=f"checkpoint written by training.py (default {DEFAULT_CKPT})")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"the safetensors file to write (default {DEFAULT_OUT})")
    return p


def main(argv=None):
    show_log()
    args = build_parser().parse_args(argv)
    if os.path.exists(args.out) and os.path.exists(args.ckpt) and os.path.samefile(args.out, args.ckpt):
        fail(f"--out {args.out} is the checkpoint itself; choose another file")
    try:
        export(args.ckpt, args.out)
    except CheckpointError as e:
        fail(e)
    mib = lambda path: os.path.getsize(path) / 2 ** 20     # noqa: E731
    print(f"wrote {args.out} ({mib(args.out):.1f} MiB; the checkpoint {args.ckpt}: {mib(args.ckpt):.1f} MiB)"
          + (", with the distilled student" if "student" in read_safetensors(args.out, with_metadata=True)[2] else ""))


if __name__ == "__main__":
    main()
