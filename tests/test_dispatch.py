"""The one decision of what runs at a step (runtime/dispatch.py), and the decode layer's check that
the manifest lays a layer out as it computes (runtime/decode_layer.py), against the export's layout
(export/layout.py builds the steps; the patterns are written from its documented order)."""
import importlib.util

import pytest

from export.config import parse_hf_config
from export.layout import make_layout
from export.manifest import Manifest
from export.moe_forms import MoeSchedule
from export.tiny import PRESETS, hf_config
from runtime.dispatch import NONE, BackendKernels, Dispatch

SCHEDULE = MoeSchedule.parse("gather:4,dense:16,block", 64, "test")


def test_without_kernels_the_schedule_decides_and_stats_name_the_form():
    d = Dispatch(SCHEDULE, NONE)
    for T, form in [(1, "gather"), (4, "gather"), (5, "dense"), (16, "dense"), (17, "block"), (64, "block")]:
        for decode in (True, False):
            p = d.plan(T, decode)
            assert (p.form, p.decode_layer, p.moe_kernel, p.ran) == (form, False, None, form)


def test_with_kernels_decode_layers_then_gather_then_grouped():
    d = Dispatch(SCHEDULE, BackendKernels(decode_tokens=8, moe_kernels=True, gather_tokens=16))
    assert d.plan(1, True).ran == "decode-layer" and d.plan(8, True).ran == "decode-layer"
    assert d.plan(8, False).ran == "gather-kernel"      # a prompt chunk of 8 tokens is no decode step
    assert d.plan(9, True).ran == "gather-kernel"       # past the decode layers' limit
    assert d.plan(17, True).ran == "grouped-kernel"
    assert d.plan(17, True).form == "block"             # the manifest's subgraph variant still named
    with pytest.raises(ValueError):
        d.plan(65, False)                               # past the export's largest step


def manifest(tp: int) -> Manifest:
    cfg = parse_hf_config(hf_config(PRESETS["kv8"]))
    layout = make_layout(cfg, tp, forms=SCHEDULE.forms)
    return Manifest(config=cfg, tp=tp, expert_split="intermediate", opset=0, fp32_twins=False, moe=SCHEDULE,
                    max_tokens=64, steps=layout.steps, subgraphs={s.name: s for s in layout.subgraphs}, files={},
                    producer="test")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the triton package is not installed")
@pytest.mark.parametrize("tp", [1, 2, 8])
def test_every_layer_has_the_pattern_a_decode_layer_replaces(tp):
    from runtime.decode_layer import PATTERN_TP, PATTERN_TP1, layer_pattern

    man = manifest(tp)
    want = PATTERN_TP1 if tp == 1 else PATTERN_TP
    for n in range(man.config.num_hidden_layers):
        assert layer_pattern(man, n) == want
