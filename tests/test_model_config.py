"""The typed ``model`` branch of the run config (issue 21, part 3): ``--set model.FIELD[.SUB]=V`` and
``discriminator.model.FIELD=V`` are checked against the registry preset's config dataclass like
``optim.lr`` against OptimConfig (one line, did-you-mean, the field's type), and stored into
``model_args`` as nested dicts, the format config.json and checkpoints keep."""

from __future__ import annotations

import dataclasses

import pytest

from model_zoo.package import model_config
from pretrain.config import ConfigError, apply_overrides, from_dict, to_dict
from pretrain.models import check_model_args, model_from_config
from pretrain.recipes import RunConfig, get_recipe


def _apply(recipe: str, *sets: str) -> RunConfig:
    return apply_overrides(get_recipe(recipe), list(sets))


def _one_line_error(recipe: str, *sets: str) -> str:
    with pytest.raises(ConfigError) as info:
        _apply(recipe, *sets)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1, msg
    return msg


@pytest.mark.parametrize("recipe, key, meant, cls", [
    ("vit-vqgan-ss-tiny", "model.quantizer.codebok_size", "model.quantizer.codebook_size", "QuantizerConfig"),
    ("vqgan-f8-tiny", "model.ch_mlt", "model.ch_mult", "VQGANConfig"),
    ("vim-base-tiny", "model.transformer.dept", "model.transformer.depth", "TransformerConfig"),
    ("stackformer-base-tiny", "model.grid_sise", "model.grid_size", "StackformerConfig"),
])
def test_a_typo_under_model_is_one_line_with_did_you_mean(recipe, key, meant, cls):
    msg = _one_line_error(recipe, f"{key}=8")
    assert msg.startswith(f"unknown config key '{key}' (did you mean '{meant}'?); valid here: "), msg
    assert msg.endswith(f"({cls} of model '{recipe}')"), msg


def test_nested_fields_set_the_built_models_config():
    cfg = _apply("vit-vqgan-ss-tiny", "model.quantizer.codebook_size=128", "model.quantizer.beta=0.5",
                 "model.pos_embed=sincos")
    assert cfg.model_args == {"quantizer": {"codebook_size": 128, "beta": 0.5}, "pos_embed": "sincos"}
    check_model_args(cfg)
    mc = model_config(model_from_config(cfg))
    assert mc.quantizer.codebook_size == 128 and mc.quantizer.beta == 0.5 and mc.pos_embed == "sincos"
    assert mc.quantizer.dim == model_config(model_from_config(get_recipe("vit-vqgan-ss-tiny"))).quantizer.dim
    # a prior: a tuple field and a nested transformer; the recipe's own model_args stay
    cfg = _apply("vim-base-tiny", "model.grid_size=[2,2]", "model.transformer.depth=1")
    assert cfg.model_args == {"class_dropout": 0.0, "grid_size": [2, 2], "transformer": {"depth": 1}}
    mc = model_config(model_from_config(cfg))
    assert mc.grid_size == (2, 2) and mc.transformer.depth == 1 and mc.class_dropout == 0.0
    # a whole section as JSON is merged field by field, each field checked
    cfg = _apply("vqgan-f8-tiny", 'model.quantizer={"kind": "fsq", "fsq_levels": [4, 4], "codebook_size": 16}',
                 "model.quantizer.dim=2")
    assert cfg.model_args == {"quantizer": {"kind": "fsq", "fsq_levels": [4, 4], "codebook_size": 16, "dim": 2}}
    assert model_config(model_from_config(cfg)).quantizer.fsq_levels == (4, 4)
    assert "'model.quantizer.levels'" in _one_line_error("vqgan-f8-tiny", 'model.quantizer={"levels": [4]}')


def test_config_json_keeps_the_model_args_format():
    cfg = _apply("vit-vqgan-ss-tiny", "model.quantizer.codebook_size=128")
    saved = to_dict(cfg)
    assert saved["model_args"] == {"quantizer": {"codebook_size": 128}} and "model" not in saved["model_args"]
    assert from_dict(RunConfig, saved) == cfg
    # an old run's config (model_args written by hand or by an older vqscale) still loads, and a bad
    # key in one is the same one-line error
    saved["model_args"] = {"quantizer": {"codebok_size": 128}}
    with pytest.raises(ConfigError, match=r"^unknown config key 'model_args.quantizer.codebok_size' "
                                          r"\(did you mean 'model_args.quantizer.codebook_size'\?\)"):
        from_dict(RunConfig, saved)


@pytest.mark.parametrize("sets, expected", [
    (("model.quantizer.codebook_size=abc",), "config key 'model.quantizer.codebook_size' expects int, got 'abc'"),
    (("model.quantizer.kind=fsk",), "config key 'model.quantizer.kind' must be one of 'vq', 'gumbel', 'fsq', "
                                   "'lfq', got 'fsk'"),
    (("model.quantizer.simvq=maybe",), "config key 'model.quantizer.simvq' expects bool (true/false), got 'maybe'"),
    (("model.quantizer=abc",), "config key 'model.quantizer' is a section; set its fields as "
                               "'model.quantizer.FIELD=VALUE'"),
    (("model.image_size.x=1",), "config key 'model.image_size' is a value, not a section: cannot set "
                                "'model.image_size.x'"),
])
def test_a_value_of_the_wrong_type_is_one_line(sets, expected):
    assert _one_line_error("vit-vqgan-ss-tiny", *sets) == expected


def test_model_then_model_fields_checks_against_the_new_preset():
    cfg = _apply("vim-base-tiny", "model=vim-large-tiny", "model.transformer.depth=1")
    assert cfg.model == "vim-large-tiny" and cfg.model_args["transformer"] == {"depth": 1}
    assert model_config(model_from_config(cfg)).transformer.depth == 1
    cfg = _apply("vqgan-f8-tiny", "model=vqgan-f16-tiny", "model.ch_mult=1,2")
    assert cfg.model_args == {"ch_mult": [1, 2]}
    # in order: a field of the new preset before it is selected is checked against the old one
    msg = _one_line_error("vim-base-tiny", "model.ch_mult=1,2", "model=vqgan-f8-tiny")
    assert msg.startswith("unknown config key 'model.ch_mult'") and "VIMConfig of model 'vim-base-tiny'" in msg
    # and model_args that the new preset lacks (the recipe's class_dropout) are caught before the run
    cfg = _apply("vim-base-tiny", "model=vqgan-f8-tiny")
    with pytest.raises(ConfigError, match=r"^unknown config key 'model_args.class_dropout'.*VQGANConfig of model"):
        check_model_args(cfg)
    msg = _one_line_error("vim-base-tiny", "model=vim-bse", "model.class_dropout=0.1")
    assert msg.startswith("config key 'model': unknown model 'vim-bse' (did you mean 'vim-base'?)")


def test_discriminator_model_fields():
    cfg = _apply("vit-vqgan-ss-tiny", "discriminator.model.resolution=64")
    assert cfg.discriminator.model_args == {"resolution": 64} and cfg.model_args == {}
    check_model_args(cfg)
    msg = _one_line_error("vit-vqgan-ss-tiny", "discriminator.model.resolutoin=64")
    assert msg.startswith("unknown config key 'discriminator.model.resolutoin' (did you mean "
                          "'discriminator.model.resolution'?)") and "StyleGAN2DiscConfig" in msg
    cfg = _apply("vqgan-f8-tiny", "discriminator.model.n_layers=1")
    assert cfg.discriminator.model_args == {"n_layers": 1}
    assert "'discriminator.model_args.ndff'" in _one_line_error("vqgan-f8-tiny", "discriminator.model_args.ndff=8")
    assert _one_line_error("vit-vqgan-ss-tiny", "discriminator.model=", "discriminator.model.resolution=64") == (
        "config key 'discriminator.model' names no model preset (it is ''): set discriminator.model=NAME first")
    # discriminator model_args from elsewhere (a recipe, a config file) are checked before the run too
    bad = dataclasses.replace(cfg, discriminator=dataclasses.replace(cfg.discriminator, model_args={"ndff": 8}))
    with pytest.raises(ConfigError, match=r"^unknown config key 'discriminator.model_args.ndff'"):
        check_model_args(bad)


def test_model_args_overrides_are_checked_the_same_way():
    msg = _one_line_error("vit-vqgan-ss-tiny", "model_args.quantizer.codebok_size=1024")
    assert msg.startswith("unknown config key 'model_args.quantizer.codebok_size' (did you mean "
                          "'model_args.quantizer.codebook_size'?)")
    assert _one_line_error("vim-base-tiny", "model_args.class_dropout=x") == (
        "config key 'model_args.class_dropout' expects float, got 'x'")
    cfg = _apply("vim-base-tiny", "model_args.class_dropout=0.1", "model_args.grid_size=[2,2]")
    assert cfg.model_args == {"class_dropout": 0.1, "grid_size": [2, 2]}
    assert _apply("vim-base-tiny", "model_args.class_dropout=none").model_args == {}     # removal, as before
    assert "'model_args.class_dropot'" in _one_line_error("vim-base-tiny", "model_args.class_dropot=none")
    # the whole dict as JSON: replaced, each entry checked
    cfg = _apply("vim-base-tiny", 'model_args={"transformer": {"depth": 1}, "num_classes": 10}')
    assert cfg.model_args == {"transformer": {"depth": 1}, "num_classes": 10}
    assert "'model_args.transformer.dpth'" in _one_line_error("vim-base-tiny", 'model_args={"transformer": {"dpth": 1}}')
    # the recipe's own model_args, and ones set in code, meet the same check before a run
    with pytest.raises(ConfigError, match=r"^unknown config key 'model_args.num_clases' \(did you mean "
                                          r"'model_args.num_classes'\?\)"):
        check_model_args(dataclasses.replace(get_recipe("vim-base-tiny"), model_args={"num_clases": 3}))


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    from pretrain.cli import main

    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_submit_dry_run_and_train_refuse_a_model_typo_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    expected = ("vqscale: error: unknown config key 'model.quantizer.codebok_size' (did you mean "
                "'model.quantizer.codebook_size'?); valid here: ")
    for argv in (("submit", "--dry-run", "--", "train", "--recipe", "vit-vqgan-ss-tiny",
                  "--set", "model.quantizer.codebok_size=1024"),
                 ("train", "--recipe", "vit-vqgan-ss-tiny", "--set", "model.quantizer.codebok_size=1024")):
        rc, out, err = _main(capsys, *argv)
        assert rc == 2 and out == "", (argv, out)
        assert len(err.strip().splitlines()) == 1 and err.startswith(expected), err
        assert not (tmp_path / "runs").exists()                  # nothing built, written or queued
    rc, out, err = _main(capsys, "submit", "--dry-run", "--", "train", "--recipe", "vim-base-tiny",
                         "--set", "model.transformer.dept=1")
    assert rc == 2 and err.startswith("vqscale: error: unknown config key 'model.transformer.dept' (did you mean "
                                      "'model.transformer.depth'?)") and len(err.strip().splitlines()) == 1
    # a value the preset rejects (its __post_init__) is still caught at dry-run, by the meta-device build
    rc, out, err = _main(capsys, "submit", "--dry-run", "--", "train", "--recipe", "vit-vqgan-ss-tiny",
                         "--set", "model.quantizer.kind=fsq")
    assert rc == 2 and "needs fsq_levels" in err and len(err.strip().splitlines()) == 1, err
    # and a good one reaches the resolved job config as model_args
    rc, out, err = _main(capsys, "submit", "--dry-run", "--", "train", "--recipe", "vit-vqgan-ss-tiny",
                         "--set", "model.quantizer.codebook_size=128")
    assert rc == 0, err
    assert '"model_args": {\n          "quantizer": {\n            "codebook_size": 128' in out
    assert not (tmp_path / "runs").exists()
