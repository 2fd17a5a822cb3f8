"""`chatrlhf chat` in a pseudo-terminal (pexpect) and with piped stdin."""

import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

CHATRLHF = str(Path(sys.executable).with_name("chatrlhf"))
ASK = r"Enter input \(type 'quit' to exit, 'clear' to clean memory\): "


@pytest.mark.slow  # a chat subprocess: ~5-8 s with its start-up
def test_chat_multi_round_clear_quit_in_a_terminal(apps_model_dir):
    child = pexpect.spawn(CHATRLHF, ["chat", "--path", str(apps_model_dir), "--greedy", "--show_prompt",
                                     "--max_new_tokens", "24"], encoding="utf-8", timeout=90,
                          env={"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                               "TOKENIZERS_PARALLELISM": "false"})
    try:
        child.expect(ASK)
        child.sendline("hello")
        child.expect_exact('[prompt] " Human: hello Assistant:"')
        child.expect_exact("Assistant: hi there, I am a tiny model.")
        child.expect(ASK)
        first_reply = "hi there, I am a tiny model."
        # round 2: the prompt the model sees holds round 1 (question and the cut reply)
        child.sendline("tell me a story")
        child.expect_exact('[prompt] " Human: hello Assistant: ' + first_reply
                           + ' Human: tell me a story Assistant:"')
        child.expect(ASK)
        # clear: the next prompt starts from scratch
        child.sendline("clear")
        child.expect_exact("[conversation cleared]")
        child.expect(ASK)
        child.sendline("tell me a story")
        child.expect_exact('[prompt] " Human: tell me a story Assistant:"')
        child.expect(ASK)
        child.sendline("quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.slow  # a chat subprocess: ~5-8 s with its start-up
def test_chat_with_piped_stdin_exits_cleanly_at_end_of_input(apps_model_dir):
    r = subprocess.run([CHATRLHF, "chat", "--path", str(apps_model_dir), "--greedy", "--max_new_tokens", "24"],
                       input="hello\n", capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    assert "Assistant: hi there, I am a tiny model." in r.stdout
    assert "Enter input" not in r.stdout  # no interactive prompt when stdin is a pipe


def test_chat_bad_path_is_one_clear_error(tmp_path, capsys):
    from chatrlhf.cli import main as cli

    assert cli(["chat", "--path", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
