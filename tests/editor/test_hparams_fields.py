"""Every hyperparameter field is checked when the dataclass is built: command-line strings,
harmful values and shapes that used to fail deep inside a run (or silently edit) raise a
ValueError naming the field."""

import numpy as np
import pytest

from editor import FTHParams, MEMITHParams, ROMEHParams


@pytest.mark.parametrize("field,value", [
    ("mom2_adjustment", "False"),  # a truthy string: C⁻¹ was used anyway
    ("v_lr", ".5"),
    ("v_lr", 0.0),
    ("clamp_norm_factor", 0.0),  # a zero delta, applied
    ("clamp_norm_factor", -1.0),
    ("kl_factor", -0.1),
    ("v_weight_decay", float("nan")),
    ("early_stop_nll", float("nan")),
    ("v_num_grad_steps", 0),
    ("context_lengths", ((5,),)),
    ("context_lengths", (5, 10)),
    ("context_lengths", ((10, -1),)),
    ("kl_prompts", "{} is a"),  # a string, not a tuple of prompts
    ("kl_prompts", ("is a",)),
])
def test_rome_and_memit_fields(field, value):
    with pytest.raises(ValueError, match=field):
        ROMEHParams(layer=1, **{field: value})
    if field in {f.name for f in __import__("dataclasses").fields(MEMITHParams)}:
        with pytest.raises(ValueError, match=field):
            MEMITHParams(layers=(1, 2), **{field: value})


@pytest.mark.parametrize("field,value", [("norm_constraint", -1.0), ("norm_constraint", 0.0), ("lr", "5e-4"),
                                         ("num_steps", 0), ("early_stop_nll", float("inf"))])
def test_ft_fields(field, value):
    with pytest.raises(ValueError, match=field):
        FTHParams(layer=1, **{field: value})


@pytest.mark.parametrize("field,value", [("mom2_update_weight", 0.0), ("z_batch_size", 0), ("spread", "both")])
def test_memit_fields(field, value):
    with pytest.raises(ValueError, match=field):
        MEMITHParams(layers=(1, 2), **{field: value})


def test_numpy_ints_are_stored_as_ints():
    hp = ROMEHParams(layer=np.int64(1), v_num_grad_steps=np.int32(5), clamp_norm_factor=1)
    assert type(hp.layer) is int and type(hp.v_num_grad_steps) is int and hp.clamp_norm_factor == 1.0
    assert MEMITHParams(layers=(np.int64(1), np.int64(2))).layers == (1, 2)
    assert type(MEMITHParams(layers=(np.int64(1), np.int64(2))).layers[0]) is int
    assert type(FTHParams(layer=np.int64(2)).layer) is int
    assert ROMEHParams(layer=1, context_lengths=[[10, 5]], kl_prompts=["{} is a"]).context_lengths == ((10, 5),)
