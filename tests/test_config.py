"""real.loop.config: one TrainConfig, read from YAML/TOML and flags, flags win, unknown keys are errors."""
import pytest

from real.loop.config import (
    TrainConfig,
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
    for name in TrainConfig.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in text
