"""evaluate.py: the Frechet distance against closed forms, the feature networks, the caches of the
classifier and of the test statistics, and the script end to end on tiny data (PNG folders, a tiny checkpoint)."""
import json
import math
import os
import shutil
import sys
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

import evaluate
import fid
from conftest import make_digits, run_script, write_idx
from dataset import load_dataset

CPU = torch.device("cpu")


def random_features(n, d, seed):
    """n correlated feature vectors (n, d), float64, with a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing
            + torch.randn(d, generator=g, dtype=torch.float64))


# ---- the Frechet distance ------------------------------------------------------------------------
def test_gaussian_stats_are_the_mean_and_unbiased_covariance():
    x = random_features(300, 8, 0)
    mu, cov = fid.gaussian_stats(x.float())
    assert mu.dtype == cov.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), x.float().double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.float().double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,d", [(500, 32), (20, 64)])       # the second covariance is singular (rank 19)
def test_frechet_distance_of_a_set_with_itself_is_zero(n, d):
    mu, cov = fid.gaussian_stats(random_features(n, d, 1))
    assert fid.frechet_distance(mu, cov, mu, cov) < 1e-9 * float(cov.trace())
    other_mu, other_cov = fid.gaussian_stats(random_features(n, d, 2))
    assert fid.frechet_distance(mu, cov, other_mu, other_cov) > 0.1 * float(cov.trace())


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0]), torch.tensor([1.0, -1.0, 2.0, 0.5, 0.0])
    var1, var2 = torch.tensor([1.0, 4.0, 0.25, 0.0, 2.0]), torch.tensor([9.0, 1.0, 0.25, 2.0, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * (var1 * var2).sqrt()).sum()
    got = fid.frechet_distance(mu1, torch.diag(var1), mu2, torch.diag(var2))
    assert got == pytest.approx(float(expected), rel=1e-12)


def test_frechet_distance_matches_the_closed_form_for_full_2x2_covariances():
    """Non-commuting covariances: for a 2x2 P with non-negative eigenvalues,
    Tr(P^(1/2)) = sqrt(Tr P + 2 sqrt(det P))."""
    cov1 = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    cov2 = torch.tensor([[1.0, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    mu1, mu2 = torch.tensor([0.5, -1.0]), torch.tensor([0.0, 2.0])
    product = cov1 @ cov2
    trace_sqrt = math.sqrt(float(product.trace()) + 2 * math.sqrt(float(torch.linalg.det(product))))
    expected = float(((mu1 - mu2) ** 2).sum() + cov1.trace() + cov2.trace()) - 2 * trace_sqrt
    assert fid.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-12)
    assert fid.frechet_distance(mu2, cov2, mu1, cov1) == pytest.approx(expected, rel=1e-12)   # symmetric


def test_frechet_distance_of_scaled_gaussians_in_many_dimensions():
    """S2 = c^2 S1 gives (S1 S2)^(1/2) = c S1, so the distance is (1 - c)^2 Tr S1 for equal means."""
    mu, cov = fid.gaussian_stats(random_features(400, 48, 3))
    got = fid.frechet_distance(mu, cov, mu, 2.5 ** 2 * cov)
    assert got == pytest.approx((1 - 2.5) ** 2 * float(cov.trace()), rel=1e-9)


# ---- feature networks ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_train_test(data_dir):
    return (load_dataset("mnist", data_dir, train=True, download=False),
            load_dataset("mnist", data_dir, train=False, download=False))


def test_the_classifier_learns_the_tiny_data(tiny_train_test):
    (images, labels), (test_images, test_labels) = tiny_train_test
    model = fid.train_classifier(images, labels, CPU, epochs=20)
    features, probs = fid.extract(model, test_images, CPU, batch_size=1000)
    assert features.shape == (64, fid.FEATURE_DIM) and features.dtype == torch.float64
    assert probs.shape == (64, 10) and torch.allclose(probs.sum(1), torch.ones(64))
    assert (probs.argmax(1) == test_labels).double().mean() > 0.6     # chance is 0.1


def test_extract_runs_in_eval_mode_without_gradients_and_does_not_depend_on_the_batch_size(tiny_train_test):
    images = tiny_train_test[1][0]
    model = fid.Classifier(1, 10).train()
    whole, probs = fid.extract(model, images, CPU, batch_size=1000)
    batched, _ = fid.extract(model, images, CPU, batch_size=7)
    assert not model.training and not whole.requires_grad
    torch.testing.assert_close(whole, batched, rtol=1e-5, atol=1e-6)


def test_small_grayscale_images_use_the_classifier_without_trying_inception(monkeypatch):
    def no_inception(device):
        raise AssertionError("Inception must not be loaded for 28x28 grayscale images")
    monkeypatch.setattr(fid, "load_inception", no_inception)
    assert fid.choose_features(1, 28, "auto", CPU, print) is None          # None: the classifier's features


# ---- the FID Inception (torch-fidelity's port of TensorFlow's); nothing is ever downloaded here -----
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """torch.hub's folder is an empty tmp_path/hub, and any download raises before it reaches the network."""
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no internet")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    return tmp_path / "hub" / "checkpoints"


def test_colour_images_fall_back_to_the_classifier_when_the_inception_weights_cannot_be_had(offline_hub, capsys):
    notes = []
    assert fid.choose_features(3, 32, "auto", CPU, notes.append) is None
    assert len(notes) == 1 and notes[0].startswith("note: the FID Inception-v3 weights could not be downloaded "
                                                   "(<urlopen error no internet>): put " + WEIGHTS_FILE)
    assert str(offline_hub) in notes[0] and "not with papers" in notes[0]
    assert capsys.readouterr().out == ""                              # stdout stays clean for --json
    with pytest.raises(fid.EvalError, match=WEIGHTS_FILE):        # asked for explicitly: an error
        fid.choose_features(3, 32, "inception", CPU, notes.append)
    assert not offline_hub.exists() or not any(offline_hub.iterdir())  # nothing half-downloaded left behind


@pytest.mark.parametrize("case", ["offline", "broken file", "torch-fidelity missing"])
def test_inception_without_its_weights_is_one_sentence_and_exit_1(case, offline_hub, monkeypatch, data_dir, tmp_path):
    """--features inception where the weights cannot be had stops before anything is trained, with one sentence
    that names the file and the folder it belongs in."""
    if case == "broken file":
        offline_hub.mkdir(parents=True)
        (offline_hub / WEIGHTS_FILE).write_bytes(b"cut short")
    if case == "torch-fidelity missing":
        monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)   # import fails
    pngs = write_pngs(tmp_path / "pngs", make_digits(8, 5)[0])
    with pytest.raises(SystemExit) as exit_info:              # sys.exit("error: ...") prints it and exits with 1
        evaluate.main(["--samples", pngs, "--dataset", "mnist", "--features", "inception", "--data-dir", data_dir,
                       "--cache-dir", str(tmp_path)])
    text = exit_info.value.code
    assert isinstance(text, str) and text.startswith("error: ") and "\n" not in text and text.count(". ") == 0
    expected = {"offline": f"could not be downloaded (<urlopen error no internet>): put {WEIGHTS_FILE} (from https://",
                "broken file": f"{offline_hub / WEIGHTS_FILE} is not a readable copy of the FID Inception-v3 weights (",
                "torch-fidelity missing": "the torch-fidelity package, which is not installed: "
                                          "pip install -r requirements.txt"}[case]
    assert expected in text
    if case == "offline":
        assert text.endswith(f") in {offline_hub}")
    assert not os.path.exists(tmp_path / "mnist_classifier.pth")        # failed before training anything


@pytest.mark.slow
def test_inception_without_its_weights_exits_1_as_a_script(data_dir, tmp_path, monkeypatch):
    """The user's view: exit 1, that sentence alone on stderr, nothing on stdout (run_script sends any download to
    a closed local port, so this never reaches the network either)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    pngs = write_pngs(tmp_path / "pngs", make_digits(8, 5)[0])
    result = run_script("evaluate.py", "--samples", pngs, "--dataset", "mnist", "--features", "inception",
                        "--data-dir", data_dir, "--cache-dir", tmp_path, check=False)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("error: the FID Inception-v3 weights could not be downloaded (")
    assert result.stderr.endswith(f"): put {WEIGHTS_FILE} (from {URL_INCEPTION_V3}) in {folder}\n")
    assert result.stderr.count("\n") == 1 and not (folder / WEIGHTS_FILE).exists()


def random_fid_inception():
    """torch-fidelity's network with its random initial weights (loading none)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state_dict: None)
        patch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])


def test_the_fid_inception_is_read_from_torch_hubs_folder_and_gives_2048_d_features(offline_hub):
    """Weights put in torch.hub's folder (random ones here) are loaded without a download; grayscale images give
    the features of the same image in RGB."""
    weights = random_fid_inception().state_dict()
    offline_hub.mkdir(parents=True)
    torch.save(weights, offline_hub / WEIGHTS_FILE)
    features = fid.load_inception(CPU)
    assert features.tag == "inception" and features.name == "Inception-v3 with the FID weights of papers, 2048-d"
    assert WEIGHTS_FILE in features.key and "torchvision" not in features.key       # old statistics are not reused
    torch.testing.assert_close(features.network.net.state_dict(), weights, rtol=0, atol=0)

    gray = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    colour = torch.cat([gray[:1].repeat(1, 3, 1, 1), torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)])
    gray_feats, probs = fid.extract(features.network, gray, CPU, features.batch_size)
    colour_feats, _ = fid.extract(features.network, colour, CPU, features.batch_size)
    assert gray_feats.shape == colour_feats.shape == (2, 2048) and probs is None
    scale = float(colour_feats.abs().max())
    assert scale > 0
    torch.testing.assert_close(gray_feats[0], colour_feats[0], rtol=1e-4, atol=1e-4 * scale)
    assert not torch.allclose(colour_feats[0], colour_feats[1], rtol=1e-3, atol=1e-3 * scale)


def test_the_fid_inception_sees_the_exact_uint8_pixels():
    """torch-fidelity's network takes uint8 pixels, as TensorFlow's graph did: the wrapper gives them back exactly
    from extract's [-1, 1] floats, grayscale as three equal channels."""
    seen = []

    def recorder(pixels):
        seen.append(pixels.clone())
        return (torch.zeros(len(pixels), 2048),)
    images = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(2, 1, 1, 1)
    fid.extract(fid.InceptionFeatures(recorder), images, CPU, batch_size=2)
    assert seen[0].dtype == torch.uint8 and torch.equal(seen[0], images.repeat(1, 3, 1, 1))


def test_classifier_summary():
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.2, 0.2], [0.1, 0.1, 0.8]])
    summary = evaluate.classifier_summary(probs, requested=torch.tensor([0, 1, 1, 2]))
    assert summary["confidence"] == pytest.approx((0.9 + 0.7 + 0.6 + 0.8) / 4)
    shares = [0.5, 0.25, 0.25]                                                    # predicted classes 0, 1, 0, 2
    assert summary["class_balance"] == pytest.approx(-sum(p * math.log(p) for p in shares) / math.log(3))
    assert (summary["rarest_class_share"], summary["commonest_class_share"]) == (0.25, 0.5)
    assert summary["label_agreement"] == 0.75
    even = evaluate.classifier_summary(torch.eye(4))
    assert even["class_balance"] == pytest.approx(1.0) and "label_agreement" not in even


# ---- caches ----------------------------------------------------------------------------------------
def write_pngs(folder, images, mode="RGB"):
    """uint8 images (N, H, W) as PNGs 00000.png, ... (RGB by default, as sampling.py --individual writes them)."""
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(np.asarray(image, dtype=np.uint8)).convert(mode).save(os.path.join(folder, f"{i:05d}.png"))
    return str(folder)


def run_in_process(capsys, *args):
    """evaluate.py's main() in this process (no start-up cost): its stdout."""
    capsys.readouterr()
    evaluate.main([str(a) for a in args])
    return capsys.readouterr().out


def fid_row(stdout):
    """The numbers of the table's FID row, which must name its features."""
    row = next(line for line in stdout.splitlines() if line.startswith("FID (features: "))
    assert "FID (features: self-trained mnist classifier, 128-d)" in row
    return row.split(")")[-1].split()


@pytest.mark.slow
def test_classifier_and_statistics_caches_are_reused_and_invalidated(data_dir, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    raw = data / "MNIST" / "raw"
    args = ["--samples", write_pngs(tmp_path / "pngs", make_digits(40, 5)[0]), "--dataset", "mnist", "--data-dir", data]
    # --cache-dir defaults to --data-dir
    classifier, stats = data / "mnist_classifier.pth", data / "mnist_test_stats_classifier.pth"

    def times():
        return [classifier.stat().st_mtime_ns, stats.stat().st_mtime_ns]

    first = run_script("evaluate.py", *args).stdout                  # two runs as a user makes them
    classifier_time, stats_time = times()
    assert "classifier: training a small CNN on the 256 mnist training images" in first
    assert "accuracy on the 64 test images" in first and "test statistics: 64 mnist test images" in first

    second = run_script("evaluate.py", *args).stdout
    assert "classifier: reusing the cached" in second and "test statistics: reusing the cached" in second
    assert "classifier: training" not in second and times() == [classifier_time, stats_time]
    assert fid_row(second) == fid_row(first)

    write_idx(raw, "t10k", *make_digits(64, 7))            # new test data: same classifier, new statistics
    third = run_in_process(capsys, *args)
    assert "classifier: reusing the cached" in third and "the test data changed" in third
    assert times()[0] == classifier_time and times()[1] != stats_time
    assert fid_row(third) != fid_row(first)

    write_idx(raw, "train", *make_digits(256, 8))          # new training data: a new classifier, new statistics
    fourth = run_in_process(capsys, *args)
    assert "classifier: training" in fourth and "the training data changed" in fourth
    assert "the feature network changed" in fourth and times()[0] != classifier_time


def test_another_recipe_or_version_retrains_and_an_unreadable_cache_is_rebuilt(tiny_train_test, tmp_path, monkeypatch):
    train, test = tiny_train_test
    notes = []
    first, _ = fid.get_classifier("mnist", train, test, str(tmp_path), 1, CPU, notes.append)
    fid.get_classifier("mnist", train, test, str(tmp_path), 1, CPU, notes.append)
    assert "reusing" in notes[-1]
    fid.get_classifier("mnist", train, test, str(tmp_path), 2, CPU, notes.append)
    assert "the number of training epochs changed" in notes[-2]
    fid.get_classifier("mnist", train, test, str(tmp_path), 1, CPU, notes.append)
    monkeypatch.setattr(fid, "CLASSIFIER_VERSION", fid.CLASSIFIER_VERSION + 1)
    fid.get_classifier("mnist", train, test, str(tmp_path), 1, CPU, notes.append)
    assert "the classifier version changed" in notes[-2]
    (tmp_path / "mnist_classifier.pth").write_bytes(b"truncated")
    again, _ = fid.get_classifier("mnist", train, test, str(tmp_path), 1, CPU, notes.append)
    assert "unreadable" in notes[-2] and again.key == first.key         # retrained with a fixed seed: the same weights


# ---- the script end to end -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_samples_folder_scores_the_test_set_itself_zero_and_noise_far_above_the_floor(data_dir, tmp_path, cache_dir,
                                                                                      capsys):
    test_images = load_dataset("mnist", data_dir, train=False, download=False)[0][:, 0]
    common = ["--dataset", "mnist", "--data-dir", data_dir, "--cache-dir", cache_dir, "--json"]
    same = json.loads(run_in_process(capsys, "--samples", write_pngs(tmp_path / "test", test_images), *common))
    assert same["num_images"] == same["num_test_images"] == 64 and same["real_floor"]["num_images"] == 64
    assert same["features"] == "self-trained mnist classifier, 128-d"
    floor = same["real_floor"]["fid"]
    assert same["generated"]["fid"] < 1e-6 * floor

    noise = np.random.default_rng(0).integers(0, 256, (30, 28, 28))
    noisy = json.loads(run_in_process(capsys, "--samples", write_pngs(tmp_path / "noise", noise, mode="L"), *common))
    assert noisy["num_images"] == noisy["real_floor"]["num_images"] == 30
    assert noisy["generated"]["fid"] > 5 * noisy["real_floor"]["fid"] > 0
    for key in ("confidence", "class_balance", "rarest_class_share", "commonest_class_share"):
        assert 0 <= noisy["generated"][key] <= 1
    assert "label_agreement" not in noisy["generated"]

    first_ten = json.loads(run_in_process(capsys, "--samples", tmp_path / "test", "--num-samples", "10", *common))
    assert first_ten["num_images"] == 10 and first_ten["real_floor"]["num_images"] == 10


@pytest.mark.slow
def test_checkpoint_end_to_end_equals_scoring_its_samples_as_pngs(train_tiny, data_dir, tmp_path, cache_dir, capsys):
    train_tiny(tmp_path / "run", "--epochs", "1", "--conditional")
    ckpt = tmp_path / "run" / "ddpm_ckpt.pth"
    options = ["--sampler", "ddim", "--steps", "5", "--num-samples", "24", "--batch-size", "16", "--seed", "3",
               "--precision", "fp32"]
    common = ["--data-dir", data_dir, "--cache-dir", cache_dir, "--json"]
    direct = json.loads(run_script("evaluate.py", "--ckpt", ckpt, *options, *common).stdout)   # stdout: the JSON only
    assert direct["source"] == f"{ckpt} (5-step DDIM (eta 0), guidance 1)"
    assert direct["num_images"] == direct["real_floor"]["num_images"] == 24
    assert 0 <= direct["generated"]["label_agreement"] <= 1 and direct["generated"]["fid"] > 0

    run_script("sampling.py", "--ckpt", ckpt, "--out-dir", tmp_path / "samples", *options, "--individual")
    from_pngs = json.loads(run_in_process(capsys, "--samples", tmp_path / "samples" / "individual",
                                          "--dataset", "mnist", *common))
    # the same images, so the same numbers (up to float32 sums in another thread count: the subprocess runs 2)
    assert "label_agreement" not in from_pngs["generated"]                  # a folder's labels are unknown
    assert from_pngs["generated"] == pytest.approx({key: direct["generated"][key] for key in from_pngs["generated"]},
                                                   rel=1e-6)
    assert from_pngs["real_floor"] == pytest.approx(direct["real_floor"], rel=1e-6)

    table = evaluate.format_table(direct)
    assert f"24 images from {ckpt} (5-step DDIM (eta 0), guidance 1)" in table
    assert float(fid_row(table)[0]) == pytest.approx(direct["generated"]["fid"], abs=5e-4)
    assert "classifier agrees with the requested label" in table and "real (floor)" in table


class StandIn(torch.nn.Module):
    """A tiny deterministic feature network in Inception's place: 4x4 average pools and their squares, 32-d."""

    def forward(self, x):
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), 4).flatten(1)
        return torch.cat([pooled, pooled ** 2], 1), None


def test_inception_fid_is_the_frechet_distance_of_its_features_by_the_classifiers_code_path(
        data_dir, tmp_path, monkeypatch, capsys):
    """--features inception with a stand-in network: the FID printed is the Frechet distance between the Gaussians
    of the stand-in's features of the samples and of the test split, and the classifier still gives its rows."""
    stand_in = fid.Features(StandIn(), "stand-in, 32-d", "stand-in", "stand-in 1", batch_size=7)
    monkeypatch.setattr(fid, "load_inception", lambda device: stand_in)
    samples = make_digits(30, 5)[0]
    args = ["--samples", write_pngs(tmp_path / "pngs", samples, mode="L"), "--dataset", "mnist", "--features",
            "inception", "--data-dir", data_dir, "--cache-dir", tmp_path, "--json"]
    result = json.loads(run_in_process(capsys, *args))
    assert result["features"] == "stand-in, 32-d" and result["classifier"] == "self-trained mnist classifier, 128-d"
    assert os.path.exists(tmp_path / "mnist_test_stats_stand-in.pth")

    train, test = (load_dataset("mnist", data_dir, train=split, download=False)[0] for split in (True, False))

    def stand_in_fid(images):
        return fid.frechet_distance(*fid.gaussian_stats(fid.extract(StandIn(), images, CPU, 64)[0]),
                                    *fid.gaussian_stats(fid.extract(StandIn(), test, CPU, 64)[0]))
    assert result["generated"]["fid"] == pytest.approx(stand_in_fid(torch.from_numpy(samples).unsqueeze(1)), rel=1e-9)
    assert result["real_floor"]["fid"] == pytest.approx(stand_in_fid(evaluate.real_slice(train, 30)), rel=1e-9)
    assert result["generated"]["fid"] > 0 and 0 <= result["generated"]["confidence"] <= 1


def test_an_error_is_one_sentence_on_stderr_without_a_traceback(data_dir, tmp_path):
    result = run_script("evaluate.py", "--samples", tmp_path / "nowhere", "--dataset", "mnist", "--data-dir", data_dir,
                        "--cache-dir", tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == f"error: there is no folder {tmp_path / 'nowhere'}\n"


@pytest.mark.parametrize("case,message", [
    ("missing checkpoint", "there is no checkpoint at"),
    ("empty folder", "holds no PNG files"),
    ("single PNG", "holds a single PNG, and FID needs at least 2 images"),
    ("wrong size", "is 32x32 pixels, but mnist images are 28x28"),
    ("missing data", "train-images-idx3-ubyte"),
])
def test_errors_are_one_clear_sentence(case, message, data_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    write_pngs(tmp_path / "big", np.zeros((3, 32, 32)))
    write_pngs(tmp_path / "one", np.zeros((1, 28, 28)))
    data = str(tmp_path / "nodata") if case == "missing data" else data_dir
    args = {"missing checkpoint": ["--ckpt", tmp_path / "none.pth"],
            "empty folder": ["--samples", tmp_path / "empty", "--dataset", "mnist"],
            "single PNG": ["--samples", tmp_path / "one", "--dataset", "mnist"],
            "wrong size": ["--samples", tmp_path / "big", "--dataset", "mnist"],
            "missing data": ["--samples", tmp_path / "big", "--dataset", "mnist"]}[case]
    with pytest.raises(SystemExit) as exit_info:             # sys.exit("error: ...") prints it and exits with 1
        evaluate.main([str(a) for a in args] + ["--data-dir", data, "--cache-dir", str(tmp_path)])
    text = exit_info.value.code
    assert isinstance(text, str) and text.startswith("error: ") and message in text and "\n" not in text
    assert not os.path.exists(tmp_path / "mnist_classifier.pth")        # failed before training anything


def test_unlabelled_data_or_data_without_a_test_split_is_refused(tiny_train_test):
    (images, labels), test = tiny_train_test
    with pytest.raises(fid.EvalError, match="no labels"):
        evaluate.check_splits("folder", (images, None), test)
    with pytest.raises(fid.EvalError, match="no test split"):
        evaluate.check_splits("folder", (images, labels), (images.clone(), labels))
    evaluate.check_splits("mnist", (images, labels), test)


@pytest.mark.parametrize("argv,message", [
    (["--samples", "x"], "--samples needs --dataset"),
    (["--samples", "x", "--ckpt", "y", "--dataset", "mnist"], "not allowed with argument"),
    (["--eta", "2"], "--eta must lie between 0 and 1"),
    (["--num-samples", "1"], "at least 2"),
    (["--guidance-scale", "-1"], "--guidance-scale must be 0 or more"),
    (["--features", "vgg"], "invalid choice"),
])
def test_impossible_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
