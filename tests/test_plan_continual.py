"""The planner counts what continual operation adds: the anchor pass and features, the scale search's copies."""

import pytest

from lorsu_edge import plan as P
from lorsu_edge.config import MethodConfig
from lorsu_edge.profiles import get_profile
from lorsu_edge.tiny import save_tiny


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny("clip", tmp_path_factory.mktemp("clip"))


def _phase(plan, name):
    return next(p for p in plan.phases if p.name == name)


def _component(phase, name):
    return next((c.bytes for c in phase.components if c.name == name), 0)


def test_anchors_add_their_forward_and_their_features(clip_dir):
    """Catches an anchor pass the planner does not see: the train peak must grow with it."""
    kw = dict(loss="clip", batch_size=8, profile=get_profile("cpu"))
    plain, anchored = P.make_plan(clip_dir, **kw), P.make_plan(clip_dir, anchors=100, **kw)
    assert anchored.micro_batch == plain.micro_batch
    train, train0 = _phase(anchored, "train"), _phase(plain, "train")
    assert _component(train, "anchor features") > 0 == _component(train0, "anchor features")
    assert _component(train, "activations + workspace") > _component(train0, "activations + workspace")
    assert train.peak > train0.peak


def test_full_keeps_a_copy_of_the_tower_for_the_scale_search(clip_dir):
    kw = dict(loss="clip", batch_size=8, profile=get_profile("cpu"))
    full = P.make_plan(clip_dir, method_cfg=MethodConfig(method="full"), **kw)
    lorsu = P.make_plan(clip_dir, **kw)
    assert _component(_phase(full, "train"), "scale-search copies") > 0
    assert _component(_phase(lorsu, "train"), "scale-search copies") == 0
    merge = _component(_phase(lorsu, "merge"), "scale-search copies")
    assert merge == lorsu.trainable_params * 4  # the trained update, kept to rescale from
