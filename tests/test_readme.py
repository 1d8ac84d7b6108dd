"""README's quickstart commands are the ones CI and the tests exercise."""

import importlib.util
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def quickstart_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("python3 -m venv")]


def test_readme_opens_with_two_commands():
    commands = quickstart_commands()
    assert len(commands) == 2, commands
    assert "pytest" in commands[1] and "[test]" in commands[1]


def test_ci_runs_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quickstart_commands()[1] in ci_lines


def test_main_command_names_an_existing_module_and_config():
    main = quickstart_commands()[0]
    module = re.search(r"python -m ([\w.]+)", main).group(1)
    assert importlib.util.find_spec(module) is not None, module
    for config in re.findall(r"--config (\S+)", main):
        assert (ROOT / config).exists(), config


def test_main_command_runs_the_demo_from_its_checked_warmstart():
    """The main job reads assets/demo_warmstart, which must be in the checkout and match its
    manifest (a fresh clone runs it as is)."""
    from recap_jax import demo, demo_settings

    assert re.search(r"python -m recap_jax\.demo --workdir \S+$", quickstart_commands()[0])
    names = demo.verify_manifest(demo_settings.WARMSTART_DIR)
    assert "model.safetensors" in names and "tokenizer.json" in names
