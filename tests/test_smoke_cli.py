from tests.conftest import REPO


def test_unknown_override_key_fails_with_suggestion(cli):
    code, _, err = cli("config", "show", "--config", str(REPO / "configs/demo.yaml"), "lora.rr=8")
    assert code == 2
    assert "lora.rr" in err and "'r'" in err
