"""evaluate.py: the Frechet distance against closed forms, the feature networks, the caches of the
classifier and of the test statistics, and the script end to end on tiny data (PNG folders, a tiny checkpoint)."""
import json
import math
import os
import shutil
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import evaluate
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
    mu, cov = evaluate.gaussian_stats(x.float())
    assert mu.dtype == cov.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), x.float().double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(x.float().double().numpy(), rowvar=False), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,d", [(500, 32), (20, 64)])       # the second covariance is singular (rank 19)
def test_frechet_distance_of_a_set_with_itself_is_zero(n, d):
    mu, cov = evaluate.gaussian_stats(random_features(n, d, 1))
    assert evaluate.frechet_distance(mu, cov, mu, cov) < 1e-9 * float(cov.trace())
    other_mu, other_cov = evaluate.gaussian_stats(random_features(n, d, 2))
    assert evaluate.frechet_distance(mu, cov, other_mu, other_cov) > 0.1 * float(cov.trace())


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0, 3.0, -1.0]), torch.tensor([1.0, -1.0, 2.0, 0.5, 0.0])
    var1, var2 = torch.tensor([1.0, 4.0, 0.25, 0.0, 2.0]), torch.tensor([9.0, 1.0, 0.25, 2.0, 0.5])
    expected = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * (var1 * var2).sqrt()).sum()
    got = evaluate.frechet_distance(mu1, torch.diag(var1), mu2, torch.diag(var2))
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
    assert evaluate.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-12)
    assert evaluate.frechet_distance(mu2, cov2, mu1, cov1) == pytest.approx(expected, rel=1e-12)   # symmetric


def test_frechet_distance_of_scaled_gaussians_in_many_dimensions():
    """S2 = c^2 S1 gives (S1 S2)^(1/2) = c S1, so the distance is (1 - c)^2 Tr S1 for equal means."""
    mu, cov = evaluate.gaussian_stats(random_features(400, 48, 3))
    got = evaluate.frechet_distance(mu, cov, mu, 2.5 ** 2 * cov)
    assert got == pytest.approx((1 - 2.5) ** 2 * float(cov.trace()), rel=1e-9)


# ---- feature networks ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_train_test(data_dir):
    return (load_dataset("mnist", data_dir, train=True, download=False),
            load_dataset("mnist", data_dir, train=False, download=False))


def test_the_classifier_learns_the_tiny_data(tiny_train_test):
    (images, labels), (test_images, test_labels) = tiny_train_test
    model = evaluate.train_classifier(images, labels, CPU, epochs=20)
    features, probs = evaluate.extract(model, test_images, CPU, batch_size=1000)
    assert features.shape == (64, evaluate.FEATURE_DIM) and features.dtype == torch.float64
    assert probs.shape == (64, 10) and torch.allclose(probs.sum(1), torch.ones(64))
    assert (probs.argmax(1) == test_labels).double().mean() > 0.6     # chance is 0.1


def test_extract_runs_in_eval_mode_without_gradients_and_does_not_depend_on_the_batch_size(tiny_train_test):
    images = tiny_train_test[1][0]
    model = evaluate.Classifier(1, 10).train()
    whole, probs = evaluate.extract(model, images, CPU, batch_size=1000)
    batched, _ = evaluate.extract(model, images, CPU, batch_size=7)
    assert not model.training and not whole.requires_grad
    torch.testing.assert_close(whole, batched, rtol=1e-5, atol=1e-6)


def test_small_grayscale_images_use_the_classifier_without_trying_inception(monkeypatch):
    def no_inception(device):
        raise AssertionError("Inception must not be loaded for 28x28 grayscale images")
    monkeypatch.setattr(evaluate, "load_inception", no_inception)
    classifier = object()
    assert evaluate.choose_features(1, 28, "auto", classifier, CPU, print) is classifier


def test_colour_images_fall_back_to_the_classifier_when_the_inception_weights_cannot_be_loaded(
        monkeypatch, tmp_path, capsys):
    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no internet")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))                   # no weights cached there
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)    # and no download
    notes, classifier = [], object()
    assert evaluate.choose_features(3, 32, "auto", classifier, CPU, notes.append) is classifier
    assert len(notes) == 1 and "Inception-v3 weights (inception_v3_google-" in notes[0]
    assert str(tmp_path) in notes[0] and "could not be downloaded (<urlopen error no internet>)" in notes[0]
    assert capsys.readouterr().out == ""                              # stdout stays clean for --json
    with pytest.raises(evaluate.EvalError, match="Inception-v3 weights"):      # asked for explicitly: an error
        evaluate.choose_features(3, 32, "inception", classifier, CPU, notes.append)


def test_inception_features_are_2048_d_for_colour_and_grayscale(monkeypatch):
    """The wrapper around torchvision's Inception-v3 (random weights here: nothing is downloaded)."""
    real_inception_v3 = torchvision.models.inception_v3
    monkeypatch.setattr(torchvision.models, "inception_v3", lambda weights, transform_input: real_inception_v3(
        weights=None, aux_logits=True, init_weights=False, transform_input=transform_input))
    features = evaluate.choose_features(3, 32, "auto", object(), CPU, print)
    assert features.tag == "inception" and "Inception-v3" in features.name
    for channels in (3, 1):
        images = torch.randint(0, 256, (2, channels, 32, 32), dtype=torch.uint8)
        feats, probs = evaluate.extract(features.network, images, CPU, features.batch_size)
        assert feats.shape == (2, 2048) and probs is None


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
    first, _ = evaluate.get_classifier("mnist", train, test, str(tmp_path), 1, CPU, notes.append)
    evaluate.get_classifier("mnist", train, test, str(tmp_path), 1, CPU, notes.append)
    assert "reusing" in notes[-1]
    evaluate.get_classifier("mnist", train, test, str(tmp_path), 2, CPU, notes.append)
    assert "the number of training epochs changed" in notes[-2]
    evaluate.get_classifier("mnist", train, test, str(tmp_path), 1, CPU, notes.append)
    monkeypatch.setattr(evaluate, "CLASSIFIER_VERSION", evaluate.CLASSIFIER_VERSION + 1)
    evaluate.get_classifier("mnist", train, test, str(tmp_path), 1, CPU, notes.append)
    assert "the classifier version changed" in notes[-2]
    (tmp_path / "mnist_classifier.pth").write_bytes(b"truncated")
    again, _ = evaluate.get_classifier("mnist", train, test, str(tmp_path), 1, CPU, notes.append)
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


def test_checkpoint_end_to_end_equals_scoring_its_samples_as_pngs(train_tiny, data_dir, tmp_path, cache_dir, capsys):
    train_tiny(tmp_path / "run", "--epochs", "1", "--conditional")
    ckpt = tmp_path / "run" / "ddpm_ckpt.pth"
    options = ["--sampler", "ddim", "--steps", "5", "--num-samples", "24", "--batch-size", "16", "--seed", "3",
               "--precision", "fp32"]
    common = ["--data-dir", data_dir, "--cache-dir", cache_dir, "--json"]
    direct = json.loads(run_script("evaluate.py", "--ckpt", ckpt, *options, *common).stdout)   # stdout: the JSON only
    assert direct["source"] == f"{ckpt} (5-step DDIM (eta 0), guidance 2)"
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
    assert f"24 images from {ckpt} (5-step DDIM (eta 0), guidance 2)" in table
    assert float(fid_row(table)[0]) == pytest.approx(direct["generated"]["fid"], abs=5e-4)
    assert "classifier agrees with the requested label" in table and "real (floor)" in table


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
    with pytest.raises(evaluate.EvalError, match="no labels"):
        evaluate.check_splits("folder", (images, None), test)
    with pytest.raises(evaluate.EvalError, match="no test split"):
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
