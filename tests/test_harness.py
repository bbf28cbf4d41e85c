"""Benchmark scorers on hand-written completions; HumanEval executed (canonical 1.0, empty 0.0)."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import tracemalloc
import uuid

import pytest

from train.eval import sandbox
from train.eval.harness import (
  extract_answer,
  extract_code,
  humaneval_problems,
  humaneval_results,
  load_items,
  math_score,
  normalize_answer,
  run_tests,
  score_benchmark,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
GSM8K_REFERENCE = "She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18"
MATH_REFERENCE = "The probability is $\\boxed{\\dfrac{1}{2}}$."


@pytest.mark.parametrize(
  "completion, reference, expected",
  [
    ("She makes 9 * 2 = 18 dollars.\n#### 18", GSM8K_REFERENCE, 1.0),  # GSM8K format
    ("So the total is $18.\nThe answer is: 18", GSM8K_REFERENCE, 1.0),  # MetaMathQA format
    ("The answer is 18.00.", GSM8K_REFERENCE, 1.0),  # decimals, trailing period
    ("9 * 2 = 18", GSM8K_REFERENCE, 1.0),  # no marker: the last number
    ("#### 1,018", "#### 1018", 1.0),  # thousands separator
    ("She makes 9 * 2 = 17 dollars.\n#### 17", GSM8K_REFERENCE, 0.0),
    ("The answer is 18 - 1 = 17", GSM8K_REFERENCE, 0.0),
    ("#### 18", "#### 180", 0.0),
    ("Half: $\\boxed{\\frac12}$", MATH_REFERENCE, 1.0),  # \frac12 == \dfrac{1}{2}
    ("\\boxed{0.5}", MATH_REFERENCE, 1.0),
    ("\\boxed{2/4}", MATH_REFERENCE, 1.0),
    ("\\boxed{\\frac{1}{3}}", MATH_REFERENCE, 0.0),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\boxed{(3,\\frac{\\pi}{2})}", 1.0),
    ("\\boxed{90^\\circ}", "\\boxed{90}", 1.0),
    ("\\boxed{\\text{(B)}}", "\\boxed{(B)}", 1.0),
    ("\\boxed{x = 5}", "\\boxed{5}", 1.0),
    ("I do not know.", GSM8K_REFERENCE, 0.0),
  ],
)
def test_math_scoring(completion, reference, expected):
  assert math_score(completion, reference) == expected


def test_extraction_prefers_boxed_then_hashes_then_the_sentence():
  assert extract_answer("The answer is 3. Final: \\boxed{\\frac{a}{b}} and 7") == "\\frac{a}{b}"
  assert extract_answer("The answer is 3.\n#### 4") == "4"
  assert extract_answer("2 apples, so the answer is 3.") == "3"
  assert extract_answer("\\boxed{unclosed") == "\\boxed{unclosed"  # broken LaTeX: the text
  assert normalize_answer("\\$1,234.50") == "2469/2"


def test_code_is_taken_from_the_first_fenced_block():
  assert (
    extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone.")
    == "def f():\n    return 1\n"
  )
  assert extract_code("    return 1\n") == "    return 1\n"  # a bare continuation


def test_humaneval_canonical_solutions_pass_and_empty_completions_fail():
  problems = humaneval_problems()
  canonical = humaneval_results(problems, {p["task_id"]: p["canonical_solution"] for p in problems})
  assert len(canonical) == 164 and all(r["passed"] for r in canonical), [
    r for r in canonical if not r["passed"]
  ]
  assert not any(r["passed"] for r in humaneval_results(problems[:10], {}))


def test_humaneval_a_chat_answer_redefining_the_function_runs():
  problem = humaneval_problems(1)[0]
  answer = f"```python\n{problem['prompt']}{problem['canonical_solution']}```"
  assert run_tests(problem, extract_code(answer)) == "passed"


# Hostile completions of HumanEval/0: `return False` ends the function, the rest runs at import.
RETURN = "    return False\n\n"


@pytest.fixture(scope="module")
def problem():
  return humaneval_problems(1)[0]


@pytest.fixture
def isolated():
  """Skips (naming why) where the kernel or the privileges do not allow namespaces."""
  reason = sandbox.isolation_unavailable()
  if reason is not None:
    pytest.skip(f"no namespace isolation here: {reason}")


@pytest.fixture
def without_isolation(monkeypatch):
  """Runs take the fallback path, as where namespaces are not available."""
  monkeypatch.setattr(sandbox, "_isolation", ["forced by the test"])


def test_without_isolation_it_warns_once_and_still_scrubs_the_environment(monkeypatch, capsys):
  monkeypatch.setattr(sandbox, "_isolation", [])
  monkeypatch.setattr(sandbox, "_probe", lambda: "unshare: Operation not permitted")
  program = "import os\nprint(sorted(os.environ))\n"
  outcomes = [sandbox.run_python(program, timeout=10) for _ in range(2)]
  assert [o.stdout for o in outcomes] == ["['HOME', 'LANG', 'PATH', 'TMPDIR']\n"] * 2
  warnings = capsys.readouterr().err.splitlines()
  assert len(warnings) == 1
  assert warnings[0].startswith("WARNING: untrusted code runs WITHOUT isolation (unshare: Oper")


def test_the_sandbox_isolates_where_the_caller_is_not_root(tmp_path):
  # `unshare --map-user` puts the caller in a user namespace as uid 1000 (a non-root caller's
  # path: a user namespace of its own, then a nested one for the program).
  if shutil.which("unshare") is None:
    pytest.skip("no `unshare` command (util-linux) here")
  probe = subprocess.run(
    ["unshare", "--user", "--map-user=1000", "--map-group=1000", "true"], capture_output=True
  )
  if probe.returncode != 0:
    pytest.skip(f"cannot make a user namespace here: {probe.stderr.decode().strip()}")
  program = (
    "import os, socket\n"
    f"print(os.getuid(), os.path.exists({str(ROOT)!r}), os.path.exists({str(tmp_path)!r}))\n"
    "try:\n"
    "  open('/usr/escaped', 'w')\n"
    "except OSError as e:\n"
    "  print(e.strerror)\n"
    "try:\n"
    "  socket.create_connection(('127.0.0.1', 9))\n"
    "except OSError as e:\n"
    "  print(e.strerror)\n"
  )
  runner = (
    "import sys\nfrom train.eval import sandbox\n"
    "print(sandbox.isolation_unavailable())\n"
    "print(sandbox.run_python(sys.stdin.read(), timeout=20).stdout, end='')\n"
  )
  done = subprocess.run(
    ["unshare", "--user", "--map-user=1000", "--map-group=1000", sys.executable, "-c", runner],
    input=program,
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
  )
  assert done.stdout.splitlines() == [
    "None",
    "1000 False False",  # neither the project nor the caller's /tmp are there
    "Read-only file system",
    "Network is unreachable",
  ]


@pytest.mark.parametrize("exit_call", ["sys.exit(0)", "os._exit(0)", "raise SystemExit"])
def test_humaneval_an_exit_before_the_tests_fails(problem, exit_call):
  completion = RETURN + f"import os, sys\n{exit_call}\n"
  assert run_tests(problem, completion) == "failed: exit code 0 before the tests finished"


def test_humaneval_timeout_and_memory_bomb(problem):
  assert run_tests(problem, "    while True:\n        pass\n", timeout=1) == "timed out"
  assert run_tests(problem, "    x = bytearray(3 << 30)\n") == "failed: MemoryError"


def test_humaneval_writes_outside_the_temporary_directory_are_contained(problem, tmp_path):
  targets = [
    tmp_path / "escaped.txt",
    ROOT / "escaped.txt",
    pathlib.Path("/tmp/escaped-from-sandbox"),
  ]
  attack = "\n".join(
    f"try:\n  os.makedirs({str(t.parent)!r}, exist_ok=True)\n"
    f"  open({str(t)!r}, 'w').write('x')\nexcept OSError:\n  pass"
    for t in targets
  )
  completion = problem["canonical_solution"] + "\nimport os\nopen('mine.txt', 'w').write('ok')\n"
  assert run_tests(problem, completion + attack + "\n") == "passed"
  assert not [t for t in targets if t.exists()]


def _processes_with(tag: str) -> list[int]:
  """Host pids whose command line holds `tag`."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      if tag.encode() in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
        found.append(int(pid))
    except OSError:
      pass
  return found


# Forks 20 daemons (double fork, new session, stdio detached) tagged in their command line; each writes a byte
# once running, and the program waits for all 20 before the tests run.
DAEMONS = """
import os, sys, time
ready, started = os.pipe()
os.set_inheritable(started, True)
for _ in range(20):
  if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
      for fd in range(3):
        os.dup2(os.open(os.devnull, os.O_RDWR), fd)
      daemon = "import os, sys, time; os.write(int(sys.argv[1]), b'x'); time.sleep(60)"
      os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", daemon, str(started), TAG])
    os._exit(0)
deadline, count = time.time() + 30, 0
while count < 20 and time.time() < deadline:
  count += len(os.read(ready, 20))
print("daemons running:", count)
"""


@pytest.mark.parametrize("isolation", ["isolated", "without_isolation"])
def test_humaneval_no_detached_child_survives(problem, isolation, request):
  request.getfixturevalue(isolation)
  tag = f"sandbox-daemon-{uuid.uuid4().hex}"
  program = problem["canonical_solution"] + DAEMONS.replace("TAG", repr(tag))
  assert run_tests(problem, program, timeout=60) == "passed"
  assert _processes_with(tag) == []


def test_humaneval_the_callers_secrets_are_not_readable(isolated):
  # /proc/<pid>/environ shows a process's environment as it started: the secret is given to a
  # scoring process, the candidate's parent, not set in this one.
  secret = f"hf_secret{uuid.uuid4().hex}"
  attack = (
    "import os\n"
    "seen = [repr(dict(os.environ))]\n"
    "for pid in [str(os.getppid()), *filter(str.isdigit, os.listdir('/proc'))]:\n"
    "  try:\n"
    "    seen.append(open(f'/proc/{pid}/environ').read())\n"
    "  except OSError:\n"
    "    pass\n"
    "print(seen)\n"
    "raise RuntimeError('environments seen: ' + repr(seen))\n"
  )
  scorer = (
    "import json, sys\n"
    "from train.eval.harness import humaneval_problems, humaneval_results\n"
    "records = humaneval_results(humaneval_problems(1), {'HumanEval/0': sys.stdin.read()})\n"
    "print(json.dumps(records))\n"
  )
  done = subprocess.run(
    [sys.executable, "-c", scorer],
    input=RETURN + attack,
    capture_output=True,
    text=True,
    check=True,
    env={**os.environ, "HF_TOKEN": secret},
    cwd=ROOT,
  )
  [record] = json.loads(done.stdout)
  assert record["result"].startswith("failed: RuntimeError: environments seen:")  # it ran
  assert "LANG" in record["result"]
  assert secret not in done.stdout + done.stderr


def test_humaneval_no_connection_leaves_the_sandbox(problem, isolated):
  with socket.create_server(("127.0.0.1", 0)) as listener:
    port = listener.getsockname()[1]
    attack = (
      "import _socket, subprocess, sys\n"
      "try:\n"
      "  _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM).connect(('127.0.0.1', PORT))\n"
      "except OSError as e:\n"
      "  print('direct:', e)\n"
      "connect = 'import socket; socket.create_connection((\"127.0.0.1\", PORT), timeout=5)'\n"
      "subprocess.run([sys.executable, '-c', connect])\n"
    ).replace("PORT", str(port))
    assert run_tests(problem, problem["canonical_solution"] + "\n" + attack) == "passed"
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing waits to be accepted
      listener.accept()


def test_humaneval_a_fork_bomb_is_contained(problem, isolated):
  # Bounded, so that a broken sandbox leaves 200 sleeping processes rather than a dead machine.
  tag = f"sandbox-bomb-{uuid.uuid4().hex}"
  bomb = (
    "import os, time\nrefused = 0\nfor _ in range(200):\n  try:\n    if os.fork() == 0:\n"
    "      time.sleep(30)\n      os._exit(0)\n  except OSError:\n    refused += 1\n"
    "raise RuntimeError(f'forks refused: {refused}')\n"
  )
  completion = RETURN + (
    f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {bomb!r}, {tag!r}])\n"
  )
  result = run_tests(problem, completion)
  assert result.startswith("failed: RuntimeError: forks refused: ")
  assert int(result.rpartition(" ")[2]) >= 200 - sandbox.Limits().processes
  assert _processes_with(tag) == []


def test_humaneval_an_exit_code_of_124_is_not_a_timeout(problem):
  # 124 is the launcher's code for a timeout: the harness's clock decides, not the code.
  completion = (
    RETURN + "import os, sys\nprint('it failed', file=sys.stderr, flush=True)\nos._exit(124)\n"
  )
  assert run_tests(problem, completion) == "failed: it failed"


def test_humaneval_keeps_a_bounded_tail_of_100_mb_of_stderr(problem):
  flood = RETURN + (
    "import sys\nfor _ in range(100):\n  sys.stderr.write('x' * (1 << 20))\n"
    "raise RuntimeError('the last line')\n"
  )
  tracemalloc.start()
  try:
    result = run_tests(problem, flood)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert result == "failed: RuntimeError: the last line"
  assert peak < 1 << 20  # read as it comes: never the whole output in memory


def test_a_venv_in_a_project_shows_the_sandbox_its_interpreter_and_libraries_only(
  isolated, tmp_path
):
  # A venv made in a project's root (`python -m venv .`): its prefix also holds the project's
  # .env and the Unix socket of a service it runs.
  project = tmp_path / "project"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", project], check=True)
  (project / ".env").write_text("HF_TOKEN=hf_secret\n")
  program = (
    "import os, socket, sys\n"
    f"project = {os.path.realpath(project)!r}\n"
    "print(sys.prefix == project, sorted(os.listdir(project)))\n"
    "for attack in (lambda: open(project + '/.env'),\n"
    "    lambda: socket.socket(socket.AF_UNIX).connect(project + '/service.sock')):\n"
    "  try:\n"
    "    print('reached', attack())\n"
    "  except OSError as e:\n"
    "    print(e.strerror)\n"
  )
  runner = (
    "import sys\nfrom train.eval import sandbox\n"
    "outcome = sandbox.run_python(sys.stdin.read(), timeout=20)\n"
    "print(outcome.stdout + outcome.stderr, end='')\n"
  )
  with socket.socket(socket.AF_UNIX) as service:
    service.bind(str(project / "service.sock"))
    service.listen()
    done = subprocess.run(
      [project / "bin" / "python", "-c", runner],
      input=program,
      capture_output=True,
      text=True,
      check=True,
      cwd=ROOT,
    )
  assert done.stdout.splitlines() == [
    "True ['bin', 'lib', 'pyvenv.cfg']",  # the venv's interpreter, with its site-packages
    "No such file or directory",
    "No such file or directory",
  ]


# Runs the program on its stdin in the sandbox, as an evaluator does.
EVALUATOR = "import sys\nfrom train.eval import sandbox\nsandbox.run_python(sys.stdin.read(), 60)\n"


def _wait_until(condition, seconds: float) -> bool:
  deadline = time.monotonic() + seconds
  while not condition() and time.monotonic() < deadline:
    time.sleep(0.05)
  return condition()


def test_a_killed_evaluators_sandbox_dies_with_it_and_the_next_run_removes_its_folder(
  isolated, tmp_path
):
  tag = f"sandbox-orphan-{uuid.uuid4().hex}"
  sleepers = (  # the program and a child of it
    "import os, sys\nos.fork()\n"
    f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {tag!r}])\n"
  )
  env = {**os.environ, "TMPDIR": str(tmp_path)}
  evaluator = subprocess.Popen(
    [sys.executable, "-c", EVALUATOR], stdin=subprocess.PIPE, text=True, env=env, cwd=ROOT
  )
  evaluator.stdin.write(sleepers)
  evaluator.stdin.close()
  assert _wait_until(lambda: len(_processes_with(tag)) == 2, 20)
  live = tmp_path / f"sandbox-{os.getpid()}-live"  # a running evaluator's (this one's)
  live.mkdir()
  evaluator.kill()
  evaluator.wait()
  assert _wait_until(lambda: _processes_with(tag) == [], 2)
  assert list(tmp_path.glob(f"sandbox-{evaluator.pid}-*"))  # left behind by the SIGKILL
  subprocess.run(
    [sys.executable, "-c", EVALUATOR], input="", text=True, env=env, cwd=ROOT, check=True
  )
  assert [p.name for p in tmp_path.iterdir()] == [live.name]


def test_gsm_symbolic_held_out_items_take_the_gsm8k_path():
  from train.config import load_config
  from train.examples import reasoning_gym_examples

  cfg = load_config({"data": {"task": "gsm_symbolic", "train_size": 4, "eval_size": 3}}).data
  items = load_items("gsm8k", reasoning_gym_examples(cfg)[1])
  texts = [f"Step by step... The answer is {it['reference']}." for it in items[:2]] + ["#### -1"]
  accuracy, records = score_benchmark("gsm8k", items, texts)
  assert len(items) == 3 and accuracy == 2 / 3 and [r["score"] for r in records] == [1.0, 1.0, 0.0]


def test_cli_scores_a_completions_file(tmp_path):
  problems = humaneval_problems(4)
  path = tmp_path / "completions.jsonl"
  path.write_text(
    "".join(
      json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n"
      for p in problems[:3]
    )
  )  # the fourth is missing: empty
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "train.eval",
      "--benchmark",
      "humaneval",
      "--limit",
      "4",
      "--completions",
      str(path),
    ],
    capture_output=True,
    text=True,
    check=True,
  )
  assert done.stdout.strip().endswith("humaneval pass@1 0.7500 (3/4)")


@pytest.mark.parametrize(
  "row, message",
  [
    ('{"completion": "x"}', "c.jsonl:2: no 'task_id' in this record (keys ['completion'])"),
    ('{"task_id": "HumanEval/1", "completion": 7}', "c.jsonl:2: 'completion' is a number"),
    ('["HumanEval/1", "x"]', "c.jsonl:2: a record must be an object, got an array"),
    ("HumanEval/1: x", "c.jsonl:2: malformed JSON line: Expecting value"),
    (
      '{"task_id": "HumanEval/0", "completion": "y"}',
      "c.jsonl:2: task_id 'HumanEval/0' is given twice, on lines 1 and 2: keep one",
    ),
    (
      '{"task_id": "HumanEval_1", "completion": "x"}',
      "c.jsonl:2: task_id 'HumanEval_1' is not one of the benchmark's: did you mean 'HumanEval/1'?",
    ),
  ],
)
def test_cli_names_the_line_of_a_bad_completions_record(
  row, message, tmp_path, monkeypatch, capsys
):
  from train.eval import cli, harness

  def no_scoring(*args, **kwargs):
    raise AssertionError("scored a completions file with a bad record")

  monkeypatch.setattr(harness, "score_benchmark", no_scoring)
  completions = tmp_path / "c.jsonl"
  completions.write_text('{"task_id": "HumanEval/0", "completion": "x"}\n' + row + "\n")
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["--benchmark", "humaneval", "--limit", "1", "--completions", str(completions)])
  assert exit_info.value.code == 2
  assert f"{tmp_path}/{message}" in capsys.readouterr().err


@pytest.mark.parametrize(
  "arguments, message",
  [
    (["--limit", "0"], "--limit=0 must be >= 1"),
    (["--limit", "-1"], "--limit=-1 must be >= 1"),
    (["--output", "{tmp}"], "--output={tmp} is a directory: give a file, e.g. {tmp}/results.jsonl"),
    (["--output", "{tmp}/missing/r.jsonl"], "--output={tmp}/missing/r.jsonl: directory"),
    (["--timeout", "0"], "--timeout=0.0 must be > 0"),
    (["--completions", "{tmp}/none.jsonl"], "--completions={tmp}/none.jsonl: no such file"),
  ],
)
def test_cli_rejects_bad_arguments_before_any_work(
  arguments, message, tmp_path, monkeypatch, capsys
):
  from train.eval import cli, harness

  def no_work(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")

  monkeypatch.setattr(harness, "load_items", no_work)
  completions = tmp_path / "completions.jsonl"
  completions.write_text("")
  argv = ["--benchmark", "humaneval", "--completions", str(completions)]
  argv += [a.format(tmp=tmp_path) for a in arguments]
  with pytest.raises(SystemExit) as exit_info:
    cli.main(argv)
  assert exit_info.value.code == 2
  assert message.format(tmp=tmp_path) in capsys.readouterr().err
