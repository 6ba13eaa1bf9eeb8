"""The click group: version, help on every command, error lines and exit codes."""

import pytest
from click.testing import CliRunner

from ddpmseg.core.version import __version__
from ddpmseg.backbone.bundled import resolve_checkpoint
from ddpmseg.cli.main import cli

COMMANDS = ["extract", "fit", "predict", "evaluate", "report", "demo", "check-checkpoint",
            "train-backbone", "import-run", "export-run", "suggest", "sweep", "verify", "labels"]


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_every_command_is_registered_with_help_and_an_example():
    assert sorted(cli.commands) == sorted(COMMANDS)
    for name in COMMANDS:
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Example" in result.output and f"ddpmseg {name}" in result.output, name


def test_unknown_device_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--device", "tpu"])
    assert result.exit_code == 2
    assert "error: unknown device 'tpu'" in result.output
    assert "Traceback" not in result.output


def test_unknown_config_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path), "--config", "nope"])
    assert result.exit_code == 2 and "nope" in result.output


def test_check_checkpoint():
    path = resolve_checkpoint("bundled:faces_64")
    result = CliRunner().invoke(cli, ["check-checkpoint", str(path), "--preset", "faces_64"])
    assert result.exit_code == 0, result.output
    assert "c668b8e5e14bdfdd8726817be16ec9ad5d3647e94bcc10bf5775f816cb704edc" in result.output
    wrong = CliRunner().invoke(cli, ["check-checkpoint", str(path), "--preset", "tiny64_cosine"])
    assert wrong.exit_code == 1 and wrong.output.startswith("error: ")


@pytest.mark.parametrize("debug", [False, True])
def test_debug_shows_the_traceback(tmp_path, debug):
    args = ["--debug"] if debug else []
    result = CliRunner().invoke(cli, [*args, "check-checkpoint", str(tmp_path / "x.pt")])
    assert result.exit_code != 0
    if debug:
        assert result.exception is not None and not isinstance(result.exception, SystemExit)
    else:
        assert "error: checkpoint" in result.output and isinstance(result.exception, SystemExit)


def test_library_parameters_become_options_in_cli_errors():
    from ddpmseg.cli.common import as_flags
    text = "pass `resize=True`, `num_classes=N`, `images_dir=DIR` or `progress=False`; a=b stays"
    assert as_flags(text) == "pass --resize, --num-classes N, --images DIR or --no-progress; a=b stays"


def test_library_parameters_spelled_otherwise_map_to_real_options():
    """Each parameter whose option is spelled otherwise (_FLAG_NAMES) becomes that option, and
    that option exists on some command (a typo or a rename there fails here)."""
    from ddpmseg.cli.common import _FLAG_NAMES, as_flags

    assert as_flags("pass `resume=False`") == "pass --overwrite"
    assert as_flags("pass `resume=True`") == "pass --resume"
    assert as_flags("give `save_every=M` or `out_dir=DIR`") == \
        "give --save-every-minutes M or --out DIR"
    assert as_flags("`max_image_pixels=N`, `images_per_batch=N`, `iterations=N`") == \
        "--max-image-pixels N, --images-per-batch N, --iterations N"
    options = {opt for command in cli.commands.values() for param in command.params
               for opt in getattr(param, "opts", ())}
    for option in _FLAG_NAMES.values():
        assert f"--{option}" in options, option


@pytest.mark.parametrize("command, args, module, after", [
    ("extract", ["in", "s.zarr"], "ddpmseg.pipelines.extract",
     "rerun the same command to resume"),
    ("evaluate", ["p", "g"], "ddpmseg.outputs.evaluate", "rerun the same command to resume"),
    ("predict", ["run", "in", "out"], "ddpmseg.pipelines.predict",
     "the prediction folder is as it was; rerun the same command to predict again"),
])
def test_ctrl_c_while_a_command_imports_the_library_is_one_line(monkeypatch, command, args,
                                                                 module, after):
    """A command imports the library (torch: seconds) inside the group's handler, so a Ctrl-C
    landing there is the one line, exit 130; here the import itself raises, no timing."""
    import builtins

    real_import = builtins.__import__

    def interrupted(name, *rest, **kwargs):
        if name == module:
            raise KeyboardInterrupt
        return real_import(name, *rest, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    result = CliRunner().invoke(cli, [command, *args])
    assert result.exit_code == 130, result.output
    assert result.stderr == f"error: interrupted; {after}\n"


def test_notes_show_options_not_parameters(tmp_path, capsys):
    # A library note naming a parameter reaches the CLI user as the option.
    import logging

    from ddpmseg.cli.common import configure_logging

    configure_logging(quiet=False)
    logging.getLogger("ddpmseg.somewhere").warning("note: pass `resize=True` to stretch it")
    assert "note: pass --resize to stretch it" in capsys.readouterr().err
