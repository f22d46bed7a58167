"""LoraConfig maps onto PEFT's LoraConfig and back."""

from __future__ import annotations

import dataclasses
import math

import peft

from lorakit import LoraConfig


def test_field_names_are_peft_field_names():
    ours = {f.name for f in dataclasses.fields(LoraConfig)} - {"merge_weights", "svd_solver", "svd_cache"}  # lorakit-only
    theirs = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert ours <= theirs, ours - theirs


def test_peft_dict_round_trip():
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], exclude_modules=["lm_head"], layers_to_transform=[0, 2],
        layers_pattern="layers", lora_dropout=0.1, bias="lora_only", use_rslora=True, modules_to_save=["score"],
        rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 2.0}, init_lora_weights="gaussian", merge_weights=True,
    )
    data = config.to_peft_dict()
    assert data["peft_type"] == "LORA" and data["merge_weights"] is True
    assert LoraConfig.from_peft_dict(data) == config


def test_reads_what_peft_writes():
    reference = peft.LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn"], fan_in_fan_out=True, rank_pattern={"h.0.c_attn": 2})
    config = LoraConfig.from_peft_dict(reference.to_dict())
    assert (config.r, config.lora_alpha, config.fan_in_fan_out, config.rank_pattern) == (4, 32, True, {"h.0.c_attn": 2})
    assert sorted(config.target_modules) == ["c_attn"]


def test_scale_rules():
    assert LoraConfig(r=16, lora_alpha=32, target_modules=["q"]).scale_for(16, 32) == 2.0
    assert math.isclose(LoraConfig(r=16, lora_alpha=32, target_modules=["q"], use_rslora=True).scale_for(16, 32), 8.0)
