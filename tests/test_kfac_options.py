"""The preconditioner's composition contracts: options record, constructor signature, method registry, step plan."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

from onlinela_torch import KFACPreconditioner
from onlinela_torch import experiment as ex
from onlinela_torch.methods import METHOD_SPECS, METHODS, StepSchedule, int_schedule
from onlinela_torch.options import ATTRIBUTES, KFACOptions


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def test_an_unknown_keyword_is_a_type_error_naming_it_and_the_class():
    with pytest.raises(TypeError, match=r"KFACPreconditioner\(\) got an unexpected keyword argument 'dampnig'"):
        KFACPreconditioner(_model(), dampnig=0.1)


def test_the_signature_lists_every_option_keyword_only_with_its_default():
    params = inspect.signature(KFACPreconditioner).parameters
    fields = {f.name: f.default for f in dataclasses.fields(KFACOptions) if f.init}
    assert list(params) == ["model", *fields]
    for name, default in fields.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default == default, name


def test_the_experiment_option_filter_still_rejects_an_unknown_kfac_option():
    with pytest.raises(ex.OptionError, match="does not accept"):
        ex.build_stepper("kfac", _model(), lr=0.1, kfac_options={"no_such_option": 1})


@pytest.mark.parametrize("method", METHODS)
def test_options_read_as_attributes_hold_the_methods_resolved_defaults(method):
    pre = KFACPreconditioner(_model(), method=method)
    spec = METHOD_SPECS[method]
    assert pre.damping_convention == spec.damping_convention == ("product" if method == "kfac" else "factor")
    assert pre.options.low_rank_grad is spec.low_rank_grad is spec.brand
    assert pre.brand is pre.options.brand is not None
    for name in ATTRIBUTES:
        assert getattr(pre, name) is getattr(pre.options, name), name
    with pytest.raises(AttributeError, match="no_such_attribute"):
        pre.no_such_attribute  # noqa: B018


def test_forwarded_methods_carry_their_parts_documentation():
    for name in ("fisher_backward", "paused", "remove_hooks", "effective_lr", "absolute_damping", "model_curvature"):
        method = getattr(KFACPreconditioner, name)
        assert method.__doc__ and method.__doc__ == method.__wrapped__.__doc__, name
    assert "likelihood" in inspect.signature(KFACPreconditioner.fisher_backward).parameters


def _schedule(method: str, *, warmup: bool, t_updt: int = 3, t_inv: int = 10) -> StepSchedule:
    n = int_schedule(2, "n")
    return StepSchedule(METHOD_SPECS[method], int_schedule(t_updt, "u"), int_schedule(t_inv, "i"),
                        int_schedule(t_updt, "u"), n, n, warmup=warmup, damping_varies=False)


@pytest.mark.parametrize("method", METHODS)
def test_the_plan_without_warmup_is_the_modulo_rule_of_the_registry(method):
    spec, sched = METHOD_SPECS[method], _schedule(method, warmup=False)
    for k in range(60):
        plan = sched.plan(k, brand_updates=k)  # correction after every 2nd Brand update: odd counts before it
        assert plan.ea == (k % 3 == 0) and plan.decompose == (k % 10 == 0)
        assert plan.brand == (spec.brand and k % 3 == 0)
        assert plan.overwrite == (spec.overwrite and k % 20 == 0)
        assert plan.correct == (spec.correct and plan.brand and (k + 1) % 2 == 0)


def test_the_warmup_captures_the_first_four_steps_and_decomposes_after_4_and_16():
    sched = _schedule("kfac", warmup=True, t_updt=10, t_inv=50)
    plans = [sched.plan(k, 0) for k in range(60)]
    assert [k for k, p in enumerate(plans) if p.ea] == [0, 1, 2, 3, 10, 20, 30, 40, 50]
    assert [k for k, p in enumerate(plans) if p.decompose] == [3, 15, 50]
