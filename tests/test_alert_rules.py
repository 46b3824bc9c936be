"""The shipped Prometheus rules and Alertmanager config, checked by the real tools (Debian packages)."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*command: str, cwd: str = ROOT) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_the_alerting_rules_are_valid():
    assert "SUCCESS: 11 rules found" in run("promtool", "check", "rules", "conf/prometheus/alerts.yml")


def test_every_alerting_rule_fires_and_stays_quiet_as_its_unit_tests_expect():
    out = run("promtool", "test", "rules", "alerts_test.yml", cwd=os.path.join(ROOT, "tests", "prometheus"))
    assert "SUCCESS" in out


def test_every_rule_has_a_unit_test():
    import yaml

    with open(os.path.join(ROOT, "conf", "prometheus", "alerts.yml"), encoding="utf-8") as fh:
        rules = {r["alert"] for group in yaml.safe_load(fh)["groups"] for r in group["rules"]}
    with open(os.path.join(ROOT, "tests", "prometheus", "alerts_test.yml"), encoding="utf-8") as fh:
        tested = {t["alertname"] for case in yaml.safe_load(fh)["tests"] for t in case["alert_rule_test"]
                  if t.get("exp_alerts")}
    assert rules == tested


def test_the_alertmanager_example_config_is_valid():
    out = run("amtool", "check-config", "conf/alertmanager/alertmanager.yml")
    assert "SUCCESS" in out and "2 receivers" in out
