"""real.loop.config: a common TrainConfig plus the method's own section, read from YAML/TOML and flags, flags win,
unknown keys and settings of another method are errors that name them."""
import json
import re
import typing

import pytest

from real.loop.config import (
    FIELD_NAMES,
    METHOD_FIELD_OWNERS,
    SECTION_FIELDS,
    TrainConfig,
    config_json,
    build_parser,
    config_from_args,
    load_config_file,
    make_config,
    parse_train_args,
)


def test_defaults_validate():
    cfg = TrainConfig().validate()
    assert cfg.method == "real" and cfg.model == "tiny" and cfg.data == ["synthetic"]


def test_flags_parse_to_typed_fields():
    cfg = parse_train_args(["--method", "grpo", "--steps", "7", "--lr", "3e-4", "--data", "a.json", "b.jsonl",
                            "--no-progress", "--tiny-config", "num_hidden_layers=1", "hidden_size=32",
                            "--adam-betas", "0.8", "0.95"])
    assert (cfg.method, cfg.steps, cfg.lr) == ("grpo", 7, 3e-4)
    assert cfg.data == ["a.json", "b.jsonl"] and cfg.progress is False
    assert cfg.tiny_config == {"num_hidden_layers": 1, "hidden_size": 32}
    assert cfg.adam_betas == [0.8, 0.95]


def test_yaml_file_then_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: tract\nsteps: 11\nlr: 0.001\ndata: [x.json]\ngradient-checkpointing: true\n")
    args = build_parser().parse_args(["--config", str(path), "--steps", "5"])
    cfg = config_from_args(args)
    assert cfg.method == "tract" and cfg.lr == 0.001 and cfg.data == ["x.json"]
    assert cfg.gradient_checkpointing is True
    assert cfg.steps == 5  # the flag wins over the file


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('method = "raft"\nsteps = 4\nschedule = "cosine"\nwarmup_steps = 2\n')
    cfg = config_from_args(build_parser().parse_args(["--config", str(path)]))
    assert (cfg.method, cfg.steps, cfg.schedule, cfg.warmup_steps) == ("raft", 4, "cosine", 2)


def test_unknown_key_in_file_is_an_error_with_a_suggestion(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: real\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rate'"):
        load_config_file(str(path))
    path.write_text("grup_size: 4\n")
    with pytest.raises(ValueError, match=r"did you mean 'group_size'"):
        load_config_file(str(path))


def test_unknown_keyword_and_bad_values():
    with pytest.raises(ValueError, match="unknown config key 'stepz'"):
        make_config(stepz=3)
    with pytest.raises(ValueError, match="steps must be an integer"):
        make_config(steps="many")
    with pytest.raises(ValueError, match="method must be one of"):
        make_config(method="ppo")
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        make_config(method="real", group_size=1)
    with pytest.raises(ValueError, match="top_p"):
        make_config(top_p=1.5)
    with pytest.raises(ValueError, match="tiny_config only applies"):
        make_config(model="/some/model", tiny_config={"hidden_size": 8})
    with pytest.raises(ValueError, match="resume and overwrite"):
        make_config(resume=True, overwrite=True)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config_file(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ValueError, match="could not be parsed"):
        load_config_file(str(bad))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config_file(str(listing))
    other = tmp_path / "run.ini"
    other.write_text("x=1")
    with pytest.raises(ValueError, match="unknown extension"):
        load_config_file(str(other))


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for name in FIELD_NAMES + tuple(METHOD_FIELD_OWNERS):  # the common settings and every method's own
        assert "--" + name.replace("_", "-") in text
    assert "settings of methods real, grpo" in text and "settings of method tract" in text


# --- the method's own section ---------------------------------------------------------------------------------

def test_each_method_reads_its_own_section_and_only_the_policy_gradient_ones_share_one():
    from real.methods import METHODS

    assert set(SECTION_FIELDS["real"]) >= {"lam", "mu", "prob_bonus", "group_filter", "max_fill_rounds", "adv_norm",
                                           "adv_clip", "beta", "clip_ratio", "kl_coef", "loss_agg"}
    assert set(SECTION_FIELDS["grpo"]) == {"clip_ratio", "kl_coef", "loss_agg"}
    assert set(SECTION_FIELDS["tract"]) == {"beta", "tract_cots"} and SECTION_FIELDS["raft"] == {}
    assert not set(METHOD_FIELD_OWNERS) & set(FIELD_NAMES)  # a setting is common or a method's, never both
    for name, owners in METHOD_FIELD_OWNERS.items():  # one flag per name: its owners must agree on type and values
        types = {typing.get_type_hints(METHODS[m].config_class)[name] for m in owners}
        choices = {SECTION_FIELDS[m][name].metadata.get("choices") for m in owners}
        assert len(types) == 1 and len(choices) == 1, name
    for method in METHODS:
        cfg = make_config(method=method)
        assert type(cfg.method_config) is METHODS[method].config_class


@pytest.mark.parametrize("method, key, value", [("tract", "lam", 0.1), ("raft", "beta", 1.0), ("grpo", "prob_bonus", 1.0),
                                               ("real", "tract_cots", "own"), ("tract", "kl_coef", 0.1)])
def test_a_setting_of_another_method_is_an_error_naming_it(method, key, value):
    with pytest.raises(ValueError, match=f"{key} is a setting of method.*not of '{method}'"):
        make_config(method=method, **{key: value})
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ValueError, match=f"{key} is a setting of method"):
        parse_train_args(["--method", method, flag, str(value)])


def test_a_method_section_in_a_file_is_read_and_flags_override_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: real\nlr: 1.0e-6\nreal:\n  lam: 0.5\n  kl_coef: 0.01\n  group_filter: partial\n")
    cfg = parse_train_args(["--config", str(path)])
    assert (cfg.method_config.lam, cfg.method_config.kl_coef, cfg.method_config.group_filter) == (0.5, 0.01, "partial")
    cfg = parse_train_args(["--config", str(path), "--lam", "0.25"])
    assert cfg.method_config.lam == 0.25 and cfg.method_config.kl_coef == 0.01
    flat = tmp_path / "flat.yaml"  # at the top level, as the flags are
    flat.write_text("method: tract\nbeta: 2.0\ntract_cots: own\n")
    cfg = parse_train_args(["--config", str(flat)])
    assert (cfg.method_config.beta, cfg.method_config.tract_cots) == (2.0, "own")


@pytest.mark.parametrize("text, message", [
    ("method: real\ntract:\n  beta: 1.0\n", "tract: section holds settings of method tract, but the method is 'real'"),
    ("method: real\nreal:\n  tract_cots: own\n", "real.tract_cots is not a setting of method real"),
    ("method: real\nreal:\n  lamda: 0.1\n", "real.lamda is not a setting of method real"),
    ("method: real\nlam: 0.1\nreal:\n  lam: 0.2\n", "lam is given twice"),
    ("method: real\nreal: 3\n", "real must be a mapping"),
    ("method: real\nreal:\n  kl_coef: lots\n", "kl_coef must be a number"),
    ("method: real\nreal:\n  loss_agg: sequence-sum\n", "seq-mean-token-sum"),
    ("method: real\nreal:\n  kl_coef: -1\n", "kl_coef must be >= 0"),
])
def test_a_wrong_section_or_section_key_in_a_file_is_an_error_naming_it(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_train_args(["--config", str(path)])


def test_the_switch_of_method_by_flag_refuses_the_file_section_of_the_old_one(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: real\nreal:\n  lam: 0.5\n")
    with pytest.raises(ValueError, match="but the method is 'tract'"):
        parse_train_args(["--config", str(path), "--method", "tract"])


def test_print_config_writes_the_file_layout_and_reads_back_the_same(tmp_path):
    cfg = make_config(method="real", lam=0.3, kl_coef=0.02, lr=2e-6)
    printed = json.loads(config_json(cfg))
    assert list(printed) == list(FIELD_NAMES) + ["real"] and printed["real"]["lam"] == 0.3
    assert "lam" not in printed and "method_config" not in printed
    path = tmp_path / "printed.json"
    path.write_text(config_json(cfg))
    again = parse_train_args(["--config", str(path)])
    assert again == cfg and make_config(**cfg.to_dict()) == cfg


def test_a_method_config_of_the_wrong_type_is_refused():
    """Also where dataclasses.replace switches the method but keeps the old method's section."""
    import dataclasses

    from real.methods.tract import TRACTConfig

    with pytest.raises(ValueError, match="method_config must hold method real's settings \\(RealConfig\\)"):
        TrainConfig(method="real", method_config=TRACTConfig())
    with pytest.raises(ValueError, match="method_config must hold method tract's settings"):
        dataclasses.replace(make_config(method="real"), method="tract")
    switched = dataclasses.replace(make_config(method="real"), method="tract", method_config=TRACTConfig(beta=2.0))
    assert switched.validate().method_config.beta == 2.0


def test_precedence_is_defaults_then_base_then_file_with_its_section_then_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('method = "real"\nlr = 2e-6\n[real]\nlam = 0.5\n')
    cfg = parse_train_args(["--config", str(path)], base={"lam": 0.9, "lr": 1e-3, "steps": 4})
    assert (cfg.method_config.lam, cfg.lr, cfg.steps) == (0.5, 2e-6, 4)  # the file beats the caller's base
    cfg = parse_train_args(["--config", str(path), "--lam", "0.25", "--lr", "1e-6"], base={"lam": 0.9})
    assert (cfg.method_config.lam, cfg.lr) == (0.25, 1e-6)


def test_a_wrong_method_setting_at_a_files_top_level_names_the_file_and_an_empty_section_is_empty(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: tract\nlam: 0.1\n")
    with pytest.raises(ValueError, match=r"config file .*run\.yaml.*lam is a setting of method real, not of 'tract'"):
        parse_train_args(["--config", str(path)])
    empty = tmp_path / "raft.yaml"
    empty.write_text("method: raft\nraft:\n  # no settings of its own\n")
    assert parse_train_args(["--config", str(empty)]).method == "raft"


def test_resume_compares_a_method_setting_by_name_in_either_layout():
    """--resume names a changed method setting (``lam: 0.0 -> 0.1``), whether the checkpoint saved its
    configuration in the file layout (the section under the method's name) or flat, as earlier versions did."""
    from real.loop.resume import config_changes

    now = make_config(method="real", lam=0.1).to_dict()
    sectioned = make_config(method="real").to_dict()
    flat = {k: v for k, v in sectioned.items() if k != "real"}
    flat.update(sectioned["real"])
    for saved in (sectioned, flat):
        assert config_changes(saved, now, TrainConfig().to_dict()) == ["lam: 0.0 -> 0.1"]
    assert config_changes(sectioned, make_config(method="real").to_dict()) == []
    to_tract = config_changes(sectioned, make_config(method="tract").to_dict(), TrainConfig(method="tract").to_dict())
    assert to_tract == ["method: 'real' -> 'tract'"]
