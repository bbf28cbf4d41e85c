"""Data pipeline: chat template + loss mask, packing, batching, bad inputs."""

import dataclasses
import json

import numpy as np
import pytest

from train.config import ConfigError, load_config
from train.data import Batches, pack, prepare, tokenize, tokenize_all
from train.examples import reasoning_gym_examples, table_examples
from train.models.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _cfg(tmp_path=None, **data):
  return load_config({"data": {"tokenizer": "bytes", **data}}).data


def test_tokenize_masks_only_assistant_tokens():
  messages = [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]
  ids, mask = tokenize(TOK, messages)
  prompt = TOK.encode("<user>1+1</s><assistant>")
  assert ids == prompt + TOK.encode("2</s>")
  assert mask == [0] * len(prompt) + [1, 1]  # the answer and its end-of-turn


def test_pack_segments_positions_and_shifted_targets():
  a = ([5, 6, 7], [0, 1, 1])
  b = ([8, 9], [0, 1])
  rows = pack([a, b, a], max_length=4, pack_rows=True)
  np.testing.assert_array_equal(rows["inputs"], [[5, 6, 8, 0], [5, 6, 0, 0]])
  np.testing.assert_array_equal(rows["targets"], [[6, 7, 9, 0], [6, 7, 0, 0]])
  np.testing.assert_array_equal(rows["loss_mask"], [[1, 1, 1, 0], [1, 1, 0, 0]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 2, 0], [1, 1, 0, 0]])
  np.testing.assert_array_equal(rows["positions"], [[0, 1, 0, 0], [0, 1, 0, 0]])
  unpacked = pack([a, b], max_length=4, pack_rows=False)
  assert unpacked["inputs"].shape == (2, 4)


def test_too_long_examples_are_counted():
  examples = reasoning_gym_examples(_cfg(train_size=4, eval_size=2))[0]
  _, stats = tokenize_all(TOK, examples, max_length=10, too_long="drop")
  assert stats == {"too_long_dropped": 4, "too_long_truncated": 0, "prompt_too_long": 0}
  kept, stats = tokenize_all(TOK, examples, max_length=10, too_long="truncate")
  assert stats["too_long_truncated"] == 4 and all(len(ids) == 11 for ids, _ in kept)


def test_reasoning_gym_held_out_has_no_overlap():
  train, held_out, report = reasoning_gym_examples(_cfg(train_size=300, eval_size=50))
  questions = {e.entry["question"] for e in train}
  assert len(held_out) == 50 and not any(e.entry["question"] in questions for e in held_out)
  assert "eval_overlap_removed" in report


def test_batches_deterministic_and_cover_every_row():
  rows = pack([([i, i + 1], [0, 1]) for i in range(10)], max_length=1, pack_rows=True)
  batches = Batches(rows, batch_size=4, micro_batch_size=2, seed=3)
  assert batches.shape == (2, 2, 1)
  epoch0 = np.concatenate([batches.row_ids(0), batches.row_ids(1), batches.row_ids(2)[:2]])
  assert sorted(epoch0) == list(range(10))
  again = Batches(rows, batch_size=4, micro_batch_size=2, seed=3)
  np.testing.assert_array_equal(again.row_ids(7), batches.row_ids(7))
  full = batches.local(1, "inputs", (slice(None), slice(None), slice(None)))
  half = batches.local(1, "inputs", (slice(None), slice(1, 2), slice(None)))
  np.testing.assert_array_equal(full[:, 1:2], half)


def test_files_source_with_field_mapping(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(json.dumps({"q": f"{i}+1", "a": str(i + 1)}) for i in range(20)))
  cfg = _cfg(
    source="files", train_files=[str(path)], prompt_field="q", response_field="a", eval_size=5
  )
  train_rows, eval_rows, held_out, report = prepare(cfg, TOK)
  assert report["train_examples"] == 18 and len(held_out) == 2  # a 10% tail at most
  assert eval_rows is not None and train_rows["loss_mask"].sum() > 0


def test_bad_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    prepare(_cfg(source="files", train_files=[str(tmp_path / "missing.jsonl")]), TOK)
  with pytest.raises(IsADirectoryError, match=f"^{tmp_path} is a directory, not a data file"):
    prepare(_cfg(source="files", train_files=[str(tmp_path)]), TOK)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"question": "a", "answer": "b"}\n{"question": oops}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
    prepare(_cfg(source="files", train_files=[str(bad)]), TOK)
  empty = tmp_path / "empty.csv"
  empty.write_text("question,answer\n")
  with pytest.raises(ValueError, match="empty dataset"):
    prepare(_cfg(source="files", train_files=[str(empty)]), TOK)
  wrong = tmp_path / "wrong.jsonl"
  wrong.write_text('{"x": 1}\n')
  with pytest.raises(ValueError, match=r"missing field\(s\) \['question', 'answer'\].*\['x'\]"):
    prepare(_cfg(source="files", train_files=[str(wrong)]), TOK)
  with pytest.raises(ValueError, match="no example fits"):
    prepare(_cfg(train_size=4, eval_size=2, max_length=4), TOK)


def test_jsonl_records_are_read_as_written_and_odd_rows_are_named(tmp_path):
  """No type is inferred across rows: "007", "1.50" and "true" stay the strings they are; a
  row that is not an object, or an answer that is an object, is an error at file:line."""
  answers = ["007", "1.50", "true", 42]
  path = tmp_path / "typed.jsonl"
  path.write_text(
    "".join(json.dumps({"question": f"q{i}", "answer": a}) + "\n" for i, a in enumerate(answers))
  )
  examples = table_examples(_cfg(source="files", train_files=[str(path)], eval_size=1))[0]
  written = [m["content"] for e in examples for m in e.messages if m["role"] == "assistant"]
  assert len(written) >= 3 and set(written) <= {"007", "1.50", "true", "42"}  # (shuffled)
  for row, message in (
    ('{"question": "q", "answer": {"v": 1}}', r"odd.jsonl:2: field 'answer' is an object"),
    ('["q", "a"]', r"odd.jsonl:2: a record must be an object, got an array"),
    ('"just text"', r"odd.jsonl:2: a record must be an object, got a string"),
  ):
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"question": "q", "answer": "a"}\n' + row + "\n")
    with pytest.raises(ValueError, match=message):
      table_examples(_cfg(source="files", train_files=[str(odd)]))


def test_alpaca_template_masks_the_response_and_ends_with_eos():
  class WithSpecials(ByteTokenizer):
    bos_token, eos_token = "", "</s>"

  from train.models.tokenizer import AlpacaTemplate

  tok = AlpacaTemplate(WithSpecials())
  ids, mask = tokenize(
    tok,
    [
      {"role": "system", "content": "ignored"},
      {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"},
    ],
  )
  text = TOK.decode(ids, skip_special_tokens=False)
  assert text.endswith("### Instruction:\n2+2?\n\n### Response:\n4</s>") and "ignored" not in text
  assert TOK.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "4</s>"


def test_chat_messages_column_trains_every_assistant_turn(tmp_path):
  path = tmp_path / "chat.jsonl"
  turns = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "A"},
    {"role": "user", "content": "again"},
    {"role": "assistant", "content": "B"},
  ]
  path.write_text("\n".join(json.dumps({"conversation": turns}) for _ in range(12)))
  cfg = _cfg(source="files", train_files=[str(path)], messages_field="conversation", eval_size=1)
  rows, _, _, _ = prepare(cfg, TOK)
  first = (rows["loss_mask"][0] > 0) & (rows["segment_ids"][0] == 1)  # the first packed example
  trained = rows["targets"][0][first]
  assert TOK.decode(trained, skip_special_tokens=False) == "A</s>B</s>"


def _jsonl(path, records):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
  return str(path)


@pytest.mark.parametrize(
  "record, state",
  [
    ({"question": "1+1"}, "missing or null"),
    ({"question": "1+1", "answer": None}, "missing or null"),
    ({"question": "1+1", "answer": " "}, "empty"),
    ({"question": "", "answer": "2"}, "empty"),
  ],
)
def test_a_record_without_prompt_or_response_is_named(tmp_path, record, state):
  good = {"question": "2+2", "answer": "4"}
  path = _jsonl(tmp_path / "train.jsonl", [good, "", good, record, good])
  field = "question" if "answer" in record and record["answer"] == "2" else "answer"
  with pytest.raises(ValueError, match=rf"train.jsonl:4: field '{field}' is {state}"):
    prepare(_cfg(source="files", train_files=[path]), TOK)
  csv = tmp_path / "train.csv"
  csv.write_text("question,answer\n1+1,2\n2+2,\n")
  with pytest.raises(ValueError, match=r"train.csv:3: field 'answer' is missing or null"):
    prepare(_cfg(source="files", train_files=[str(csv)]), TOK)


def test_an_empty_jsonl_is_named(tmp_path):
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match=r"empty dataset: .*empty.jsonl holds no records"):
    prepare(_cfg(source="files", train_files=[str(tmp_path / "empty.jsonl")]), TOK)


def test_prompts_longer_than_max_length_leave_no_loss_tokens(tmp_path):
  path = _jsonl(tmp_path / "train.jsonl", [{"question": "x" * 40, "answer": "y"}] * 20)
  cfg = _cfg(source="files", train_files=[path], max_length=16, too_long="truncate")
  with pytest.raises(
    ValueError,
    match=r"the training set has no loss tokens: 18 of 18 examples "
    r"have a prompt longer than data.max_length=16",
  ):
    prepare(cfg, TOK)


def _sentencepiece_tokenizer(chat_template=None):
  """A tiny Llama-2/Mistral-style SentencePiece BPE (▁ word prefix, byte fallback), trained here."""
  from tokenizers import Tokenizer, decoders, models, normalizers, trainers

  from train.models.tokenizer import Tokenizer as ChatTokenizer

  tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  tok.decoder = decoders.Sequence(
    [
      decoders.Replace("▁", " "),
      decoders.ByteFallback(),
      decoders.Fuse(),
      decoders.Strip(" ", 1, 0),
    ]
  )
  corpus = [
    "What is six times seven? The answer is 42.",
    "Six times seven is 42.",
    "Write a function that adds two numbers.",
    "def add(a, b):\n    return a + b",
    "### Instruction:\n",
    "### Response:\n",
    "[INST] hello [/INST] world",
  ] * 20
  specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
  tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
  return ChatTokenizer(
    tok, chat_template=chat_template, bos_token="<s>", eos_token="</s>", pad_token="<unk>"
  )


MISTRAL_TEMPLATE = (
  "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
  "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
  "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_sentencepiece_targets_are_the_full_text_tokens_and_decode_to_the_answer(template):
  from train.models.tokenizer import AlpacaTemplate

  tok = _sentencepiece_tokenizer(MISTRAL_TEMPLATE)
  tok = tok if template == "chat" else AlpacaTemplate(tok)
  messages = [
    {"role": "user", "content": "What is six times seven?"},
    {"role": "assistant", "content": "Six times seven is 42."},
  ]
  if template == "chat":  # two turns: both answers are trained
    messages += [
      {"role": "user", "content": "Write a function that adds two numbers."},
      {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
    ]
  ids, mask = tokenize(tok, messages)
  full = tok.apply_chat_template(messages, add_generation_prompt=False)
  assert ids == tok.encode(full)  # one encoding: training tokens = the full text's tokens
  targets = [i for i, m in zip(ids, mask) if m]
  answers = "".join(m["content"] + "</s>" for m in messages if m["role"] == "assistant")
  assert tok.decode(targets, skip_special_tokens=False) == answers
  # What encoding the answer apart gives: a ▁-prefixed first token the model never sees here.
  prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True)
  apart = tok.encode(full[len(prompt) : full.index("</s>") + 4])
  assert apart != targets[: len(apart)]


def test_held_out_problems_are_not_reorderings_of_training_ones():
  from train.examples import canonical_problem

  form = lambda q: canonical_problem({"question": q})
  assert form("3 + 45") == form("45  +  3") and form("a - b + c") == form("c - b + a")
  assert form("2 * (3 + 4)") == form("(4 + 3) * 2") and form("13 - 92") != form("92 - 13")
  assert form("8 / 2") != form("2 / 8") and form("-(1 + 2)") == form("-(2 + 1)")
  cfg = _cfg(
    train_size=300,
    eval_size=50,
    task_options={"min_terms": 2, "max_terms": 2, "max_digits": 2, "operators": ("+",)},
  )
  train, held_out, report = reasoning_gym_examples(cfg)
  seen = {canonical_problem(e.entry) for e in train}
  forms = [canonical_problem(e.entry) for e in held_out]
  assert len(held_out) == 50 and not seen & set(forms) and len(set(forms)) == len(forms)
  assert report["eval_overlap_removed"] > 0


def _record(i: int) -> bytes:
  return json.dumps({"question": f"{i}+1", "answer": str(i + 1)}).encode() + b"\n"


@pytest.mark.parametrize(
  "name, content, message",
  [
    (
      "latin1.jsonl",
      _record(1) + _record(2) + b'{"question": "caf\xe9", "answer": "1"}\n',
      r"latin1.jsonl:3:18: byte 0xe9 is not UTF-8 \(invalid continuation byte\).*iconv",
    ),
    (
      "joined.jsonl",
      b"\xef\xbb\xbf" + _record(1) + _record(2) + _record(3) + b"\xef\xbb\xbf" + _record(4),
      r"joined.jsonl:4:1: a byte-order mark \(U\+FEFF\) starts this line.*concatenated",
    ),
    (
      "joined.csv",
      b"question,answer\n1+1,2\n2+1,3\n\xef\xbb\xbf3+1,4\n",
      r"joined.csv:4:1: a byte-order mark",
    ),
    ("latin1.csv", b"question,answer\n1+1,2\ncaf\xe9,3\n", r"latin1.csv:3:4: byte 0xe9 is not"),
    ("latin1.json", b'[{"question": "\xe9", "answer": "1"}]', r"latin1.json:1:16: byte 0xe9"),
  ],
)
def test_an_encoding_error_names_file_line_and_column(tmp_path, name, content, message):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(ValueError, match=message):
    prepare(_cfg(source="files", train_files=[str(path)]), TOK)


def test_a_byte_order_mark_that_opens_the_file_is_read_past(tmp_path):
  path = tmp_path / "bom.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + b"".join(_record(i) for i in range(20)))
  train_rows, _, _, report = prepare(_cfg(source="files", train_files=[str(path)]), TOK)
  assert report["train_examples"] == 18


def test_task_options_a_task_does_not_take_are_a_config_error_listing_its_options():
  # The default's basic_arithmetic options under another task, as `data.task=leg_counting` keeps.
  cfg = load_config("configs/default.yaml", ["data.task=leg_counting"]).data
  with pytest.raises(
    ConfigError,
    match=r"data.task_options \['min_terms', .*\]: not options of reasoning-gym task "
    r"'leg_counting' \(LegCountingConfig\), which takes \['min_animals', 'max_animals'",
  ):
    reasoning_gym_examples(cfg)
  cfg = load_config(
    "configs/default.yaml",
    ["data.task=leg_counting", "data.task_options={}", "data.train_size=4", "data.eval_size=2"],
  ).data
  train, held_out, _ = reasoning_gym_examples(cfg)
  assert len(train) == 4 and "legs" in train[0].messages[-2]["content"]
  with pytest.raises(ConfigError, match=r"data.task='leg_countin'.*did you mean 'leg_counting'"):
    reasoning_gym_examples(dataclasses.replace(cfg, task="leg_countin"))
  with pytest.raises(ConfigError, match=r"data.task_options.seed: set data.train_seed/eval_seed"):
    reasoning_gym_examples(dataclasses.replace(cfg, task_options={"seed": 3}))
  with pytest.raises(ConfigError, match=r"'leg_counting': .*min_animals"):
    reasoning_gym_examples(dataclasses.replace(cfg, task_options={"min_animals": 0}))
