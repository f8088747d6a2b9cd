"""Plan selection (dinov2_fast.plan): tuned on the CPU through the interpreter with an
injected timer, so the choice logic is tested without a GPU: the right winner, the block
guard, the caches (memory, disk, stale, corrupt), forced plans, failing candidates."""

import json

import pytest
import torch

import dinov2_fast
from dinov2_fast import fused, plan
from dinov2_fast.kernels._common import count_launches
from tests._models import randomize

pytest.importorskip("triton")
pytestmark = pytest.mark.interpreter

LAYERS = 2
TINY = {"hidden_size": 128, "num_attention_heads": 2, "num_hidden_layers": LAYERS, "image_size": 56}


@pytest.fixture(autouse=True)
def plan_cache(tmp_path, monkeypatch):
    """A private plan cache folder and a fresh in-memory store for every test."""
    monkeypatch.setenv(plan.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(plan.PLAN_ENV_VAR, raising=False)
    monkeypatch.setattr(plan, "_STORE", plan._Store())
    fused._RESOLVED.clear()
    yield tmp_path / "cache" / "plans.json"
    fused._RESOLVED.clear()
    fused._EXECUTORS.clear()


class FakeTimer:
    """Milliseconds per label (default 1.0); never runs the candidate, records the labels."""

    def __init__(self, times=None):
        self.times = times or {}
        self.labels = []

    def __call__(self, label, fn):
        self.labels.append(label)
        return self.times.get(label, 1.0)


def _model(**fields):
    config = dinov2_fast.Dinov2Config(**{**TINY, **fields})
    return randomize(dinov2_fast.Dinov2Model(config)).eval()


def _pixels(batch=1):
    return torch.randn(batch, 3, 56, 56)


def _first_config_name():
    from dinov2_fast.kernels.attention import candidate_configs

    return candidate_configs(0, 64)[0].name


def test_the_fastest_passing_candidate_of_each_site_wins(plan_cache):
    triton_attention = f"attention=triton:{_first_config_name()}"
    timer = FakeTimer(
        {
            triton_attention: 0.5,
            "norm=triton": 0.5,
            "ffn=triton": 0.3,
            "block=chosen": 1.0,
            "block=unfused": 2.0,
        }
    )
    record = dinov2_fast.tune(_model(), _pixels(), timer=timer)
    expected = plan.Plan(attention=triton_attention.split("=")[1], ffn="triton", norm="triton")
    assert record.plan == expected
    assert {"attention=sdpa", "ffn=torch", "norm=torch"} <= set(record.times_ms)
    assert "tuned in" in record.reason
    saved = json.loads(plan_cache.read_text())
    assert saved["versions"] == plan.versions()
    [(key, value)] = saved["plans"].items()
    assert "D128 L2 H2 gelu" in key and "|B1|N32" in key
    assert plan.Plan(**value["plan"]) == expected


def test_unfused_is_kept_when_the_chosen_block_is_slower():
    timer = FakeTimer({"norm=triton": 0.1, "block=chosen": 3.0, "block=unfused": 2.0})
    record = dinov2_fast.tune(_model(), _pixels(), timer=timer)
    assert record.plan == plan.UNFUSED
    assert "slower" in record.reason


def test_a_cached_plan_is_reused_without_timing(plan_cache):
    model, pixels = _model(), _pixels()
    first = dinov2_fast.tune(model, pixels, timer=FakeTimer({"norm=triton": 0.1}))

    def never(label, fn):
        raise AssertionError(f"timed {label} although a plan is cached")

    assert dinov2_fast.tune(model, pixels, timer=never).plan == first.plan
    # A new process: the plan comes back from disk.
    plan._STORE = plan._Store()
    assert dinov2_fast.tune(model, pixels, timer=never).plan == first.plan
    # The same batch bucket shares it; another bucket is tuned anew.
    assert dinov2_fast.tune(model, torch.randn(1, 3, 56, 56), timer=never).plan == first.plan
    other = FakeTimer()
    dinov2_fast.tune(model, _pixels(batch=3), timer=other)
    assert other.labels


def test_a_forward_on_auto_uses_the_cached_plan():
    model, pixels = _model(), _pixels()
    record = dinov2_fast.tune(model, pixels, timer=FakeTimer({"norm=triton": 0.1}))
    with torch.no_grad():
        embedded = model.embeddings(pixels)
        run = fused.executor_for(
            model, model.config, model.encoder.layer, model.layernorm, embedded, "auto"
        )
    assert run.plan == record.plan


def test_a_stale_cache_is_discarded(plan_cache):
    model, pixels = _model(), _pixels()
    dinov2_fast.tune(model, pixels, timer=FakeTimer())
    saved = json.loads(plan_cache.read_text())
    saved["versions"]["torch"] = "0.0.0-elsewhere"
    plan_cache.write_text(json.dumps(saved))
    plan._STORE = plan._Store()
    timer = FakeTimer()
    dinov2_fast.tune(model, pixels, timer=timer)
    assert timer.labels, "a plan tuned with other versions was reused"
    assert json.loads(plan_cache.read_text())["versions"] == plan.versions()


def test_a_corrupt_cache_file_is_ignored_and_replaced(plan_cache, caplog):
    plan_cache.parent.mkdir(parents=True)
    plan_cache.write_text("{not json")
    timer = FakeTimer()
    with caplog.at_level("WARNING", logger="dinov2_fast"):
        dinov2_fast.tune(_model(), _pixels(), timer=timer)
    assert "unreadable plan cache" in caplog.text
    assert timer.labels
    assert json.loads(plan_cache.read_text())["plans"]


def test_retune_times_again():
    model, pixels = _model(), _pixels()
    dinov2_fast.tune(model, pixels, timer=FakeTimer())
    timer = FakeTimer()
    dinov2_fast.tune(model, pixels, timer=timer, retune=True)
    assert timer.labels


def test_a_numerically_failing_candidate_is_never_chosen(monkeypatch):
    from dinov2_fast.kernels import gelu

    exact = gelu.gelu
    monkeypatch.setattr(gelu, "gelu", lambda x, bias=None: exact(x, bias) * 1.01)
    fused._EXECUTORS.clear()
    timer = FakeTimer({"ffn=triton": 0.01, "norm=triton": 0.5})
    record = dinov2_fast.tune(_model(), _pixels(), timer=timer)
    assert record.plan.ffn == "torch"
    assert "2x the unfused" in record.rejected["ffn=triton"]
    assert "ffn=triton" not in timer.labels


def test_a_candidate_that_raises_is_rejected(monkeypatch):
    from dinov2_fast.kernels import layernorm

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(layernorm, "add_layerscale_layernorm", broken)
    fused._EXECUTORS.clear()
    record = dinov2_fast.tune(_model(), _pixels(), timer=FakeTimer({"norm=triton": 0.01}))
    assert record.plan.norm == "torch"
    assert record.rejected["norm=triton"] == "RuntimeError: no kernel for you"


@pytest.mark.parametrize("how", ["set_plan", "env"])
@torch.no_grad()
def test_a_forced_plan_is_obeyed(how, monkeypatch):
    model = _model().set_backend("triton")

    def force(text):
        if how == "set_plan":
            model.set_plan(text)
        else:
            monkeypatch.setenv(plan.PLAN_ENV_VAR, text)

    force("attention=sdpa,norm=torch")
    reference = _model().set_backend("torch")
    reference.load_state_dict(model.state_dict())
    pixels = _pixels(2)
    with count_launches() as launches:
        out = model(pixels)
    assert dict(launches) == {"gelu": LAYERS}
    torch.testing.assert_close(out.pooler_output, reference(pixels).pooler_output)
    force("unfused")
    with count_launches() as launches:
        model(pixels)
    assert not launches


@torch.no_grad()
def test_set_plan_none_returns_to_the_measured_plan():
    model = _model().set_backend("triton").set_plan("unfused")
    model.set_plan(None)
    with count_launches() as launches:
        model(_pixels())
    assert launches["attention"] == LAYERS


@torch.no_grad()
def test_a_forced_plan_holds_under_torch_compile():
    model = _model().set_backend("triton").set_plan({"attention": "sdpa"})
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with count_launches() as launches:
        compiled(_pixels())
    assert launches["attention"] == 0
    assert launches["add_layerscale_layernorm"] == 2 * LAYERS


@pytest.mark.parametrize(
    "text, message",
    [
        ("attention", "is not site=candidate"),
        ("mlp=triton", "site 'mlp' unknown"),
        ("ffn=fast", "ffn='fast' unknown; accepted: triton, epilogue, torch"),
        ("attention=triton:m1", "attention='triton:m1' unknown"),
        ("attention=sdpa:math", "attention='sdpa:math' unknown"),
    ],
)
def test_bad_plans_are_refused_naming_what_is_accepted(text, message, monkeypatch):
    with pytest.raises(ValueError, match=message):
        _model().set_plan(text)
    monkeypatch.setenv(plan.PLAN_ENV_VAR, text)
    with pytest.raises(ValueError, match=f"{plan.PLAN_ENV_VAR}="):
        plan.forced_sites(None)


def test_tuning_needs_cuda_without_a_timer():
    with pytest.raises(ValueError, match="CUDA device"):
        dinov2_fast.tune(_model(), _pixels())


@torch.no_grad()
def test_an_untuned_shape_off_cuda_is_never_tuned_by_a_forward():
    model = _model()
    embedded = model.embeddings(_pixels())
    record = fused.resolve(
        model, model.config, model.encoder.layer, model.layernorm, embedded, "auto"
    )
    assert "not tuned" in record.reason
    assert not plan.cached_plans()


def test_optimized_transformers_models_are_tuned_too():
    from tests._models import hf_model

    hf = dinov2_fast.optimize(hf_model(**TINY))
    record = dinov2_fast.tune(hf, _pixels(), timer=FakeTimer({"norm=triton": 0.1}))
    assert record.plan.norm == "triton"
    with pytest.raises(TypeError, match="not optimized"):
        dinov2_fast.tune(hf_model(**TINY), _pixels(), timer=FakeTimer())


def test_the_cli_lists_tuned_plans_and_tune_needs_cuda(capsys):
    from dinov2_fast import cli

    dinov2_fast.tune(_model(), _pixels(), timer=FakeTimer({"norm=triton": 0.1}))
    assert cli.main(["info"]) == 0
    shown = capsys.readouterr().out
    assert "1 tuned shapes" in shown and "norm=triton" in shown
    assert cli.main(["tune", "--device", "cpu"]) == 2
    assert "tune times the candidates on a CUDA device" in capsys.readouterr().err


def test_separate_storages_that_sit_back_to_back_are_never_one_view():
    """The CUDA allocator hands consecutive small tensors out back to back; a view across
    them would read outside the first storage."""
    buffer = torch.zeros(3 * 64)
    pieces = [torch.zeros(64) for _ in range(3)]
    assert fused._packed_view(list(buffer.split(64))) is not None
    assert fused._packed_view(pieces) is None
    # Adjacent but separate storages (a frombuffer trick stands in for the allocator).
    import numpy as np

    memory = np.zeros(3 * 64, dtype=np.float32)
    separate = [
        torch.frombuffer(memory[i * 64 : (i + 1) * 64], dtype=torch.float32) for i in range(3)
    ]
    assert all(p.untyped_storage().nbytes() == 256 for p in separate)
    assert fused._packed_view(separate) is None


@torch.no_grad()
def test_parameters_swapped_in_place_are_seen_by_the_fused_path():
    model = _model().set_backend("triton")
    pixels = _pixels()
    model(pixels)  # caches the block parts
    others = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    swapped = torch.func.functional_call(model, others, (pixels,)).pooler_output
    reference = _model().set_backend("torch")
    reference.load_state_dict(others)
    torch.testing.assert_close(swapped, reference(pixels).pooler_output, rtol=1e-4, atol=1e-4)


def test_functional_call_with_trainable_parameters_takes_the_gradient_path():
    model = _model().set_backend("triton")
    for p in model.parameters():
        p.requires_grad_(False)
    pixels = _pixels()
    model(pixels)
    weights = {name: p.clone().requires_grad_(True) for name, p in model.named_parameters()}
    out = torch.func.functional_call(model, weights, (pixels,)).pooler_output
    out.sum().backward()
    # Every weight but the mask token (no masked positions here) gets its gradient.
    assert [n for n, w in weights.items() if w.grad is None] == ["embeddings.mask_token"]


def test_a_head_is_tuned_through_its_base_model():
    head = randomize(
        dinov2_fast.Dinov2ForImageClassification(dinov2_fast.Dinov2Config(**TINY, num_labels=3))
    ).eval()
    record = dinov2_fast.tune(head, _pixels(), timer=FakeTimer({"norm=triton": 0.1}))
    assert record.plan.norm == "triton"


@torch.no_grad()
def test_a_compiled_forward_launches_the_attention_config_of_its_plan(monkeypatch):
    from dinov2_fast.kernels import attention

    name = attention.candidate_configs(0, 64)[-1].name
    configs = []
    launch = attention.flash_attention

    def recording(*args, config=None, **kwargs):
        configs.append(config)
        return launch(*args, config=config, **kwargs)

    monkeypatch.setattr(attention, "flash_attention", recording)
    model = _model().set_backend("triton").set_plan(f"attention=triton:{name}")
    expected = model(_pixels())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(_pixels())
    assert configs == [attention.AttentionConfig.from_name(name)] * (2 * LAYERS)
    assert out.last_hidden_state.shape == expected.last_hidden_state.shape
