"""Evaluation metrics on fixed inputs: FID, Inception Score, improved precision/recall, the CLIP
score adapter (tiny random CLIPModel, no download), offline errors, and DiT-XL/2 MACs through the
router (FACTS.md)."""
import json
import time

import pytest
import torch

from diffes_pl.evaluation import metrics as M


@pytest.fixture(scope="module")
def digits():
    from diffes_pl.data.digits import load_digits_split
    from diffes_pl.evaluation.features import DigitsNetwork

    images = (load_digits_split("test")[0] + 1) / 2  # 297 held-out real digits
    return images, DigitsNetwork()


# --- FID --------------------------------------------------------------------------------------------

def test_fid_of_a_set_against_itself_is_zero(digits):
    images, net = digits
    f = net.extract(images)["features"]
    assert M.fid_from_features(f, f) == pytest.approx(0, abs=1e-6)


def test_fid_of_disjoint_real_halves_is_small(digits):
    from diffes_pl.evaluation.digits_features import DigitsFeatures

    images, net = digits
    even, odd = images[::2], images[1::2]  # 149 and 148 real digits
    fid = M.fid_from_features(net.extract(even)["features"], net.extract(odd)["features"])
    assert fid == pytest.approx(8.3665, abs=0.01)  # small-sample bias in 128-d; uniform noise: ~304
    # the same through torchmetrics with the feature module on images
    assert M.fid_images(odd, even, DigitsFeatures()) == pytest.approx(fid, rel=1e-6)
    noise = torch.rand(len(images), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert M.fid_from_features(net.extract(images)["features"], net.extract(noise)["features"]) > 200


def test_confidence_fitnesses_are_the_label_probability_and_its_product_with_ssim(digits):
    """class_confidence = mean softmax probability of each probe's label (computed here from the
    classifier's logits); ssim_confidence = mean of per-probe SSIM × that probability; both raceable,
    and a wrong label lowers the confidence of real digits."""
    from diffes_pl.data.digits import load_digits_split
    from diffes_pl.evaluation.digits_classifier import load_digits_classifier
    from diffes_pl.fitness import FitnessInputs, get_metric

    images, labels = load_digits_split("test")
    images, labels = (images[:32] + 1) / 2, labels[:32]
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    inputs = FitnessInputs(blurred, blurred, images, images, labels)
    with torch.no_grad():
        probability = load_digits_classifier()(blurred * 2 - 1).softmax(dim=1)[torch.arange(32), labels]
    confidence, combined, ssim = (get_metric(n) for n in ("class_confidence", "ssim_confidence", "ssim"))
    assert torch.allclose(confidence.probe_values(inputs), probability.double(), atol=1e-6)
    assert confidence(inputs) == pytest.approx(float(probability.mean()), abs=1e-6)
    product = ssim.probe_values(inputs) * probability.double()
    assert torch.allclose(combined.probe_values(inputs), product, atol=1e-6)
    assert combined(inputs) == pytest.approx(float(product.mean()), abs=1e-6)
    assert 0 < float(product.mean()) < float(probability.mean()) < 1  # blurring lowers both
    wrong = FitnessInputs(images, images, images, images, (labels + 1) % 10)
    right = FitnessInputs(images, images, images, images, labels)
    assert confidence(wrong) < 0.1 < 0.9 < confidence(right)


def test_fitness_digits_fid_extracts_the_real_digits_once(digits, monkeypatch):
    """The digits_fid fitness keeps the real digits' statistics (reset_real_features=False): each call
    equals a freshly built FID on the same inputs, calls in a row do not leak into each other, and
    the real digits are loaded and featurised once per process."""
    from diffes_pl import fitness
    from diffes_pl.data import digits as digits_data
    from diffes_pl.evaluation.digits_features import DigitsFID, digits_fid

    images, _ = digits
    g = torch.Generator().manual_seed(0)
    fakes = [images[:64], torch.rand(64, 1, 8, 8, generator=g), images[64:160]]
    real = (digits_data.load_digits_split("train")[0] + 1) / 2
    fresh = [digits_fid(f, real) for f in fakes]
    assert fresh[0] < 30 < 200 < fresh[1]  # real digits vs noise: the values mean something
    cached = DigitsFID(real)
    assert [cached(f) for f in fakes] == pytest.approx(fresh, abs=1e-6)

    loads = []
    real_split = digits_data.load_digits_split
    monkeypatch.setattr(digits_data, "load_digits_split", lambda split: loads.append(split) or real_split(split))
    fitness._against_training_digits.cache_clear()
    metric = fitness.get_metric("digits_fid")
    got = [metric(fitness.FitnessInputs(f, None, None, None, None)) for f in fakes]
    assert got == pytest.approx(fresh, abs=1e-6) and loads == ["train"]
    fitness._against_training_digits.cache_clear()


def test_fitness_digits_kid_against_the_training_digits(digits):
    """digits_kid is `kid_unbiased` of the standardised digits features against the training digits
    (recomputed here from the parts); real digits score near 0, noise far above, and ssim_minus_kid
    is SSIM minus it. Neither is raceable (set-level)."""
    from diffes_pl import fitness
    from diffes_pl.data import digits as digits_data
    from diffes_pl.evaluation.digits_features import DigitsFeatures
    from diffes_pl.evaluation.intervals import kid_unbiased, standardise

    images, _ = digits
    noise = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    real = (digits_data.load_digits_split("train")[0] + 1) / 2
    net = DigitsFeatures().eval()
    metric = fitness.get_metric("digits_kid")
    got = [metric(fitness.FitnessInputs(f, None, None, None, None)) for f in (images[:100], noise)]
    expected = [kid_unbiased(*standardise(net(real), net(f))) for f in (images[:100], noise)]
    assert got == pytest.approx(expected, rel=1e-9)
    assert abs(got[0]) < 0.05 and got[1] > 1.0 and not metric.higher_is_better
    blurred = torch.nn.functional.avg_pool2d(images[:100], 3, stride=1, padding=1, count_include_pad=False)
    inputs = fitness.FitnessInputs(blurred, None, images[:100], None, None)
    combined = fitness.get_metric("ssim_minus_kid")
    assert combined(inputs) == pytest.approx(fitness.get_metric("ssim")(inputs) - metric(inputs), rel=1e-9)
    for name in ("digits_kid", "ssim_minus_kid"):
        with pytest.raises(ValueError, match="cannot be raced"):
            fitness.get_metric(name).probe_values(inputs)


# --- Inception Score --------------------------------------------------------------------------------

def test_inception_score_uniform_logits_is_one():
    mean, std = M.inception_score(torch.zeros(64, 10))
    assert mean == pytest.approx(1.0, abs=1e-9) and std == 0.0


def test_inception_score_confident_balanced_is_class_count():
    logits = torch.full((100, 10), -1e4)
    logits[torch.arange(100), torch.arange(100) % 10] = 0  # one-hot, every class equally often
    assert M.inception_score(logits)[0] == pytest.approx(10.0, rel=1e-6)
    assert M.inception_score(logits, splits=2)[0] == pytest.approx(M.inception_score(logits, splits=2)[0])  # seeded


# --- precision / recall -----------------------------------------------------------------------------

def test_precision_recall_identical_sets():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert M.precision_recall(x, x.clone()) == (1.0, 1.0)


def test_precision_recall_hand_computed():
    """k = 1 on a line. Real 0,1,2,3: every radius 1. Fake 0.5, 2.2, 10: radii 1.7, 1.7, 7.8.
    Fake in the real manifold: 0.5 (0.5 ≤ 1), 2.2 (0.2 ≤ 1), not 10 → precision 2/3.
    Real in the fake manifold: 0, 1, 2 (≤ 1.7 from 0.5 or 2.2), 3 (0.8 from 2.2) → recall 1."""
    line = lambda *v: torch.tensor([[x, 0.0] for x in v])
    p, r = M.precision_recall(line(0, 1, 2, 3), line(0.5, 2.2, 10), k=1)
    assert p == pytest.approx(2 / 3) and r == 1.0


def _brute(real, fake, k):
    def radius(points, i):
        return sorted(float(torch.dist(points[i], points[j])) for j in range(len(points)) if j != i)[k - 1]

    def share(points, centres):
        radii = [radius(centres, i) for i in range(len(centres))]
        inside = [any(float(torch.dist(p, c)) <= rad for c, rad in zip(centres, radii)) for p in points]
        return sum(inside) / len(points)

    return share(fake, real), share(real, fake)


def test_precision_recall_matches_brute_force_k3():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(12, 2, generator=g), torch.randn(9, 2, generator=g) + 1.5
    p, r = M.precision_recall(real, fake, k=3, chunk=4)  # chunking must not change the answer
    bp, br = _brute(real.double(), fake.double(), 3)
    assert (p, r) == (pytest.approx(bp), pytest.approx(br))
    assert (p, r) == (pytest.approx(7 / 9), pytest.approx(9 / 12))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_torch_fidelity(k):
    """The hand-written improved precision/recall equals torch-fidelity's (both of its variants:
    full distance matrix and the memory-saving one) on random features with overlapping supports."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    g = torch.Generator().manual_seed(k)
    real = torch.randn(300, 16, generator=g, dtype=torch.float64)
    fake = 0.8 * torch.randn(200, 16, generator=g, dtype=torch.float64) + 0.5
    precision, recall = M.precision_recall(real, fake, k=k, chunk=64)
    assert 0.05 < precision < 0.95 and 0.05 < recall < 0.95  # neither trivially 0 nor 1
    for save_cpu_ram in (False, True):  # torch-fidelity's convention: input1 is generated, input2 real
        theirs = prc_features_to_metric(fake, real, prc_neighborhood=k, prc_batch_size=128,
                                        save_cpu_ram=save_cpu_ram, verbose=False)
        assert precision == pytest.approx(theirs["precision"], abs=1e-6)
        assert recall == pytest.approx(theirs["recall"], abs=1e-6)


def test_precision_recall_needs_more_than_k():
    with pytest.raises(ValueError, match="more than 3"):
        M.precision_recall(torch.zeros(3, 2), torch.zeros(10, 2))


# --- CLIP score -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    folder = tmp_path_factory.mktemp("clip_tok")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)} | {c + "</w>": 26 + i for i, c in enumerate(letters)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=54, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=16, bos_token_id=52, eos_token_id=53, pad_token_id=53),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16)
    return CLIPModel(config).eval(), CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def _pooled(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_clip_score_adapter_equals_direct_cosine(tiny_clip):
    from diffes_pl.evaluation.clip import CLIPScoreAdapter

    model, processor = tiny_clip
    images = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "dog", "red car", "sky", "a tree"]

    def direct():
        pixels = processor(images=list((images * 255).round().to(torch.uint8)), return_tensors="pt")["pixel_values"]
        text = processor(text=prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            i = _pooled(model.get_image_features(pixel_values=pixels))
            t = _pooled(model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]))
        return float(100 * torch.nn.functional.cosine_similarity(i, t).mean())

    expected = direct()
    if expected <= 0:  # CLIPScore floors the mean at 0: flip the text embedding so the check bites
        with torch.no_grad():
            model.text_projection.weight.neg_()
        expected = direct()
    assert expected > 0
    score = CLIPScoreAdapter(model, processor)(images, prompts, batch_size=2)
    assert score == pytest.approx(expected, rel=1e-4)


# --- offline: missing weights are refused at once ----------------------------------------------------

def test_inception_missing_offline_is_refused_fast(tmp_path, monkeypatch):
    from diffes_pl.evaluation.features import (
        INCEPTION_FILE,
        InceptionNetwork,
        WeightsMissingError,
    )

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(WeightsMissingError) as err:
        InceptionNetwork()
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message and INCEPTION_FILE in message
    assert "load_state_dict_from_url" in message  # the pre-fetch command


def test_inception_features_come_from_torch_fidelitys_public_extractor(tmp_path, monkeypatch):
    """InceptionNetwork is torch-fidelity's FeatureExtractorInceptionV3 (no private torchmetrics
    method): one pass gives the 2048-d features and unbiased logits that torch-fidelity's and
    torchmetrics' public forwards give, here with random weights written to a file (no download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchmetrics.image.fid import NoTrainInceptionV3

    from diffes_pl.evaluation.features import InceptionNetwork

    with monkeypatch.context() as patch:  # a random-weight network, to write a weights file offline
        patch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        patch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", lambda *a, **k: {})
        torch.manual_seed(0)
        random = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(random.state_dict(), weights)
    net = InceptionNetwork(weights=weights)
    assert type(net.net) is FeatureExtractorInceptionV3
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = net.extract(images)
    assert out["features"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
    pixels = (images * 255).round().to(torch.uint8)
    with torch.no_grad():
        feats, logits = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                    feature_extractor_weights_path=str(weights))(pixels)
        torchmetrics_feats = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(weights))(pixels)
    assert torch.equal(out["features"], feats.double()) and torch.equal(out["logits"], logits.double())
    torch.testing.assert_close(out["features"], torchmetrics_feats.double().reshape(2, -1), rtol=1e-5, atol=1e-6)


def test_clip_missing_offline_is_refused_fast(monkeypatch):
    from huggingface_hub import constants

    from diffes_pl.evaluation.clip import load_clip
    from diffes_pl.evaluation.features import WeightsMissingError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(WeightsMissingError) as err:
        load_clip("openai/clip-vit-no-such-model")
    assert time.monotonic() - start < 10
    assert constants.HF_HUB_CACHE in str(err.value) and "hf download openai/clip-vit-no-such-model" in str(err.value)


# --- real-feature cache ----------------------------------------------------------------------------

def test_real_features_cached_once(tmp_path, digits):
    from diffes_pl.evaluation.features import real_features

    _, net = digits
    first = real_features("digits-test", 8, net, tmp_path, log=lambda *_: None)
    path = tmp_path / "digits-test_8px_digits-cnn.safetensors"
    mtime = path.stat().st_mtime_ns
    again = real_features("digits-test", 8, net, tmp_path, log=lambda *_: None)
    assert path.stat().st_mtime_ns == mtime and torch.equal(first["features"], again["features"])
    assert first["features"].shape == (297, 128) and first["logits"].shape == (297, 10)


# --- MACs of DiT-XL/2 through the router (FACTS.md) ---------------------------------------------------

def test_dit_xl_schedule_macs_dense_and_uniform_level8(tmp_path):
    """macs.schedule_macs over 20 DDIM steps in 10 stages: dense 2.372 T, uniform level 8 of 16
    (routed from a store, every stage installed) 1.189 T, within 0.5 %."""
    import diffes_pl as dp
    from diffes_pl.partition import StagePartition
    from diffes_pl.schedule import Schedule
    from diffes_pl.routing import Router
    from diffes_pl.macs import schedule_macs
    from diffes_pl.trajectory import TrajectoryStore, make_key

    adapter = dp.load_denoiser("facebook/DiT-XL-2-256", weights=False, device="meta")
    partition = StagePartition.from_scheduler(adapter.make_scheduler("ddim"), 20, 10)
    assert schedule_macs(adapter, None, partition) == pytest.approx(2.372e12, rel=0.005)
    stages = [{f"{g.name}.order": torch.arange(g.size) for g in adapter.unit_groups()} for _ in range(10)]
    fields = {"denoiser": adapter.identity()}
    store = TrajectoryStore.write(tmp_path / "store", {"key": make_key(fields), "key_fields": fields, "pruner": "order",
                                                       "levels_max": 16, "num_stages": 10}, stages)
    schedule = Schedule.uniform(8, 16, partition.steps_per_stage, partition=partition.to_dict())
    with Router(adapter, store, schedule) as router:
        assert schedule_macs(adapter, router, partition) == pytest.approx(1.189e12, rel=0.005)
    assert adapter.is_dense()
