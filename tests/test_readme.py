"""The README's promises that a test can hold it to."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines() if "pytest" in line]
    assert len(ci_lines) == 1, f".ci/run should have one test command line, found {ci_lines}"
    readme = (ROOT / "README.md").read_text()
    assert ci_lines[0].strip() in readme, "the test command in .ci/run is not the README's test command"


def test_readme_documents_every_train_flag():
    from smile_fast.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    readme = (ROOT / "README.md").read_text()
    missing = [
        option
        for action in train._actions
        for option in action.option_strings
        if option.startswith("--")
        and option not in ("--help", "--no-progress")
        and not option.startswith("--no-")
        and option not in readme
    ]
    assert not missing, f"train flags missing from the README: {missing}"


def test_the_readme_ops_example_runs_as_written():
    """The fused-ops section's code block, run as a user would paste it (on the ops' CPU path)."""
    import torch

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Use the fused ops in your own training code") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["model"][0].weight.grad is not None


def test_the_yaml_only_settings_are_those_without_a_flag_and_the_readme_names_them():
    from smile_fast.cli import build_parser
    from smile_fast.config import FIELD_NAMES, YAML_ONLY_SETTINGS

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    with_flags = {action.dest for action in train._actions}
    assert set(YAML_ONLY_SETTINGS) == FIELD_NAMES - with_flags, "config.YAML_ONLY_SETTINGS is out of step"
    readme = (ROOT / "README.md").read_text()
    assert not [key for key in YAML_ONLY_SETTINGS if f"`{key}`" not in readme], "a YAML-only setting is undocumented"
