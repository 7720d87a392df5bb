"""training.report_to validation, the missing-tracker check, --version and shell completion.

Tensorboard event files from a real run are tested in test_report.py, which shares that run.
"""

import pytest

from qlora_cli import __version__
from qlora_cli.errors import QloraError
from qlora_cli.preflight import check_trackers
from tests.conftest import REPO

DEMO = str(REPO / "configs/demo.yaml")


def test_one_tracker_may_be_given_as_a_string(cli):
    code, out, _ = cli("config", "show", "--config", DEMO, "training.report_to=tensorboard")
    assert code == 0
    assert "report_to:\n  - tensorboard\n" in out


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tensorbord", "training.report_to.0: Input should be 'none', 'tensorboard', 'wandb' or 'mlflow'"),
        ("[none, wandb]", "'none' cannot be combined with other trackers"),
    ],
)
def test_unknown_or_contradictory_trackers_fail_validation(cli, value, message):
    code, _, err = cli("config", "show", "--config", DEMO, f"training.report_to={value}")
    assert code == 2
    assert message in err


def test_missing_tracker_fails_with_the_install_hint(monkeypatch):
    import transformers.integrations

    monkeypatch.setattr(transformers.integrations, "is_wandb_available", lambda: False)
    with pytest.raises(QloraError, match=r"wandb is not installed: pip install 'qlora-cli\[wandb\]'"):
        check_trackers(["tensorboard", "wandb"])
    check_trackers(["none"])


def test_version_and_shell_completion_options(cli):
    code, out, _ = cli("--version")
    assert code == 0 and out.strip() == f"qlora {__version__}"
    code, out, _ = cli("--help")
    assert code == 0
    assert "--install-completion" in out and "--show-completion" in out
