"""run_command: argv only, no shell, empty environment, no injected options, bounded, killable."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from remediations import CommandSpec, PermanentError, RemediationContext, TransientError
from remediations.commands import RunCommandParams, preflight_run_command, run_command
from remediations.processes import OUTPUT_LIMIT_BYTES
from workers.alerts import Alert
from workers.templating import renderer, template_context

HOSTILE = [
    "$(touch {marker})",
    "`touch {marker}`",
    "; touch {marker}",
    "| touch {marker}",
    "&& touch {marker}",
    "{{{{ 7*7 }}}}",
    "{{{{ ''.__class__ }}}}",
    "x\ntouch {marker}",
    "x" * 10_000,
]


def ctx_for(commands: dict[str, CommandSpec], **labels: str) -> RemediationContext:
    alert = Alert.model_validate(
        {"status": "firing", "labels": labels, "startsAt": "2026-11-23T05:02:19Z", "fingerprint": "ab"}
    )
    return RemediationContext(commands=commands, render=renderer(template_context(alert)))


@pytest.fixture
def fake_ssh(tmp_path: Path) -> Path:
    """An ssh-like program that executes whatever an -oProxyCommand= option says."""
    script = tmp_path / "fake-ssh"
    script.write_text(
        "#!/bin/sh\n"
        'for arg in "$@"; do\n'
        '  case "$arg" in -oProxyCommand=*) sh -c "${arg#-oProxyCommand=}";; esac\n'
        "done\n"
        'echo "connected to $1"\n'
    )
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_labels_are_one_argument_and_execute_nothing(template: str, tmp_path: Path) -> None:
    """Shell syntax, template syntax and huge values in a label are passed as one literal argument."""
    marker = tmp_path / "pwned"
    value = template.format(marker=marker)
    spec = CommandSpec(argv=["/usr/bin/printf", "%s", "{{ labels.instance }}"])
    result = run_command(ctx_for({"c": spec}, instance=value), RunCommandParams(command="c"))
    assert result.details["argv"][2] == value
    assert result.details["stdout"] == value[:OUTPUT_LIMIT_BYTES]
    assert not marker.exists()


def test_injected_option_is_refused_before_running(fake_ssh: Path, tmp_path: Path) -> None:
    """-oProxyCommand=... from a label never reaches an ssh-like program."""
    marker = tmp_path / "pwned"
    spec = CommandSpec(argv=[str(fake_ssh), "{{ labels.instance }}", "uptime"])
    ctx = ctx_for({"ssh": spec}, instance=f"-oProxyCommand=touch {marker}")
    with pytest.raises(PermanentError, match="starts with '-'"):
        preflight_run_command(ctx, RunCommandParams(command="ssh"))
    with pytest.raises(PermanentError, match="starts with '-'"):
        run_command(ctx, RunCommandParams(command="ssh"))
    assert not marker.exists()


def test_fake_ssh_would_act_on_the_option(fake_ssh: Path, tmp_path: Path) -> None:
    """The fake ssh really is dangerous: with allow_option_args the option does execute."""
    marker = tmp_path / "pwned"
    spec = CommandSpec(argv=[str(fake_ssh), "{{ labels.instance }}"], allow_option_args=True)
    run_command(
        ctx_for({"ssh": spec}, instance=f"-oProxyCommand=touch {marker}"), RunCommandParams(command="ssh")
    )
    assert marker.exists()


def test_literal_options_are_allowed_and_normal_hosts_pass(fake_ssh: Path) -> None:
    """Options written in the config are fine; only rendered ones are checked."""
    spec = CommandSpec(argv=[str(fake_ssh), "{{ labels.instance }}", "-v"])
    result = run_command(ctx_for({"ssh": spec}, instance="db1.example"), RunCommandParams(command="ssh"))
    assert result.details["stdout"].strip() == "connected to db1.example"


def test_environment_is_empty_but_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command sees PATH and nothing else of the worker's environment."""
    monkeypatch.setenv("RESPONDER_INGEST_TOKENS", "secret-token")
    result = run_command(
        ctx_for({"env": CommandSpec(argv=["/usr/bin/env"])}), RunCommandParams(command="env")
    )
    names = {line.split("=", 1)[0] for line in result.details["stdout"].splitlines()}
    assert names == {"PATH"}


def test_nonzero_exit_is_transient_with_output() -> None:
    """A failing command is retried and its stderr is kept."""
    spec = CommandSpec(argv=["/bin/sh", "-c", "echo oops >&2; exit 3"])
    with pytest.raises(TransientError, match="exit status 3") as info:
        run_command(ctx_for({"c": spec}), RunCommandParams(command="c"))
    assert info.value.details["stderr"] == "oops\n"


def test_missing_program_and_unknown_command_are_permanent() -> None:
    """A program that is not there, or a command not declared, cannot succeed on retry."""
    with pytest.raises(PermanentError, match="cannot start"):
        run_command(ctx_for({"c": CommandSpec(argv=["/nonexistent/prog"])}), RunCommandParams(command="c"))
    with pytest.raises(PermanentError, match="unknown command"):
        run_command(ctx_for({}), RunCommandParams(command="c"))


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    """On timeout the command and its children are killed."""
    pidfile = tmp_path / "child.pid"
    spec = CommandSpec(argv=["/bin/sh", "-c", f"sleep 30 & echo $! > {pidfile}; wait"], timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TransientError, match="timed out"):
        run_command(ctx_for({"c": spec}), RunCommandParams(command="c"))
    assert time.monotonic() - started < 10
    child = int(pidfile.read_text())
    time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    """Running (a killed orphan may linger as a zombie until init reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_output_is_bounded() -> None:
    """A chatty command cannot fill memory: output is cut and marked truncated."""
    spec = CommandSpec(argv=["/bin/sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' a"])
    result = run_command(ctx_for({"c": spec}), RunCommandParams(command="c"))
    assert len(result.details["stdout"]) == OUTPUT_LIMIT_BYTES
    assert result.details["output_truncated"] is True


def test_missing_label_in_argv_fails_preflight() -> None:
    """A template naming a label the alert lacks fails instead of running with ''."""
    spec = CommandSpec(argv=["/bin/echo", "{{ labels.instance }}"])
    with pytest.raises(ValueError, match="instance"):
        preflight_run_command(ctx_for({"c": spec}), RunCommandParams(command="c"))


def test_timeout_over_the_maximum_is_refused() -> None:
    """timeout: 901s is an error, not silently cut to 900."""
    with pytest.raises(ValueError, match="900"):
        CommandSpec(argv=["/bin/true"], timeout="901s")
    assert CommandSpec(argv=["/bin/true"], timeout="900s").timeout == 900


def _script(tmp_path: Path, name: str, body: str) -> CommandSpec:
    script = tmp_path / name
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return CommandSpec(argv=[str(script)], timeout=10)


def _running(pid_file: Path) -> bool:
    deadline = time.monotonic() + 5
    while not pid_file.exists() or not pid_file.read_text().strip():
        if time.monotonic() > deadline:
            raise AssertionError(f"{pid_file} was not written")
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    time.sleep(0.3)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is not alive
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_naive_background_child_is_killed_and_counted(tmp_path: Path) -> None:
    """A service started with '&' inside the command's group is killed, and the attempt says so."""
    pids = tmp_path / "naive.pid"
    spec = _script(tmp_path, "naive.sh", f"sleep 30 &\necho $! > {pids}\necho started\n")
    result = run_command(ctx_for({"restart": spec}), RunCommandParams(command="restart"))
    assert result.details["processes_killed"] == 1
    assert result.details["kill_reason"] == "left running after the command exited"
    assert not _running(pids)


def test_detached_daemon_survives(tmp_path: Path) -> None:
    """A service detached with setsid and its output redirected outlives the command, untouched."""
    pids = tmp_path / "daemon.pid"
    spec = _script(
        tmp_path,
        "detached.sh",
        f"setsid sh -c 'echo $$ > {pids}; exec sleep 30' >/dev/null 2>&1 < /dev/null &\necho started\n",
    )
    result = run_command(ctx_for({"restart": spec}), RunCommandParams(command="restart"))
    assert result.details["processes_killed"] == 0 and "kill_reason" not in result.details
    assert _running(pids)
    os.kill(int(pids.read_text()), signal.SIGKILL)


def test_a_daemon_that_detaches_a_moment_after_the_script_exits_survives(tmp_path: Path) -> None:
    """The script exits before its background child has called setsid (here 0.2 s later, as a
    loaded machine makes it): the child is given time to leave the group, not killed in it."""
    pids = tmp_path / "late.pid"
    spec = _script(
        tmp_path,
        "late.sh",
        f"(sleep 0.2; exec setsid sh -c 'echo $$ > {pids}; exec sleep 30') >/dev/null 2>&1 < /dev/null &\n"
        "echo started\n",
    )
    result = run_command(ctx_for({"restart": spec}), RunCommandParams(command="restart"))
    assert result.details["processes_killed"] == 0 and "kill_reason" not in result.details
    assert _running(pids)
    os.kill(int(pids.read_text()), signal.SIGKILL)


def test_cancelled_attempt_stops_its_command(tmp_path: Path) -> None:
    """When the engine cancels the attempt (lease lost), the command is killed at once."""
    spec = _script(tmp_path, "long.sh", "sleep 30\n")
    context = ctx_for({"long": spec})
    threading.Timer(0.5, context.cancelled.set).start()
    started = time.monotonic()
    with pytest.raises(PermanentError, match="lost its lease") as caught:
        run_command(context, RunCommandParams(command="long"))
    assert time.monotonic() - started < 5
    assert caught.value.details["processes_killed"] >= 1
