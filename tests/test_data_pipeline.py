"""The input pipeline: exact token ids and masks, truncation, templates, grain order, resume, hosts."""

import json

import numpy as np
import pytest

from pro_jax.data import synthetic
from pro_jax.data.errors import DataError
from pro_jax.data.pipeline import Pipeline, PipelineConfig, bucket_length
from pro_jax.data.tokenize import decode_responses, encode, leading_special_tokens, make_count_tokens, truncate_prompt

PAD, BOS, EOS, UNK, SYS, USER, ASST = range(7)
WORD = {w: 7 + i for i, w in enumerate(synthetic.task_vocabulary())}  # ids written by build_tokenizer


def ids(text):
  return [WORD[w] for w in text.split()]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return synthetic.build_tokenizer(synthetic.SyntheticTaskConfig(), tmp_path_factory.mktemp("tok") / "task")


@pytest.fixture(scope="module")
def tok(tok_dir):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(tok_dir))


@pytest.fixture(scope="module")
def plain_tok(tok_dir):
  """The same vocabulary without a chat template, adding <bos> like Llama tokenizers do."""
  from tokenizers import Tokenizer, processors
  from transformers import PreTrainedTokenizerFast
  t = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
  t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
  return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<bos>",
                                 eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def task():
  return synthetic.generate_task(synthetic.SyntheticTaskConfig(seed=0, n_train=60, n_eval=0))


def example(prompt, chosen, rejected, **extra):
  msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
  ex = {"id": "x", "source": "test", "objectives": ["a", "b", "c"], "prompt": msgs, "chosen": chosen,
        "rejected": rejected, "pair_objectives": [1.0, 0.0, 1.0], "responses": [], "scores": [],
        "score_mask": []}
  ex.update(extra)
  return ex


def cfg(**kw):
  base = dict(batch_size=1, max_prompt_len=32, max_response_len=32, bucket_multiple=8, shuffle=False)
  base.update(kw)
  return PipelineConfig(**base)


def single_host(source, tokenizer, config, **kw):
  return Pipeline(source, tokenizer, config, process_index=0, process_count=1, **kw)


# ---------------------------------------------------------------------------------------------
# exact ids, masks and padding


def test_pair_batch_hand_checked(tok):
  ex = example("what color is the zorb ?", "the zorb is blue .", "sorry , i can not help with that .",
               reward_chosen=[0.5, 0.25, 1.0])
  pipe = single_host([ex], tok, cfg(extra_fields=("reward_chosen",)))
  b = next(pipe.iterator())
  prompt = [BOS, USER] + ids("what color is the zorb ?") + [ASST]  # 9 tokens
  chosen = ids("the zorb is blue .") + [EOS]  # 6
  rejected = ids("sorry , i can not help with that .") + [EOS]  # 10
  L = 24  # longest row 9 + 10 = 19 -> next multiple of 8
  want_c = prompt + chosen + [PAD] * (L - 15)
  want_r = prompt + rejected + [PAD] * (L - 19)
  np.testing.assert_array_equal(b["chosen_tokens"], [want_c])
  np.testing.assert_array_equal(b["chosen_mask"], [[1] * 15 + [0] * 9])
  np.testing.assert_array_equal(b["chosen_loss_mask"], [[0] * 9 + [1] * 6 + [0] * 9])
  np.testing.assert_array_equal(b["rejected_tokens"], [want_r])
  np.testing.assert_array_equal(b["rejected_mask"], [[1] * 19 + [0] * 5])
  np.testing.assert_array_equal(b["rejected_loss_mask"], [[0] * 9 + [1] * 10 + [0] * 5])
  np.testing.assert_array_equal(b["prompt_tokens"], [[PAD] * 7 + prompt])  # left-padded to 16
  np.testing.assert_array_equal(b["prompt_mask"], [[0] * 7 + [1] * 9])
  np.testing.assert_array_equal(b["pair_objectives"], [[1.0, 0.0, 1.0]])
  np.testing.assert_array_equal(b["example_id"], [0])
  np.testing.assert_array_equal(b["reward_chosen"], [[0.5, 0.25, 1.0]])
  assert b["chosen_tokens"].dtype == np.int32 and b["chosen_loss_mask"].dtype == np.int32
  assert b["pair_objectives"].dtype == np.float32 and b["reward_chosen"].dtype == np.float32
  assert set(b) == {"chosen_tokens", "chosen_mask", "chosen_loss_mask", "rejected_tokens", "rejected_mask",
                    "rejected_loss_mask", "prompt_tokens", "prompt_mask", "pair_objectives", "example_id",
                    "reward_chosen"}


def test_sequence_and_prompt_batches_hand_checked(tok):
  ex = example("how big is the wug ?", "the wug is tiny .", "i will not help with this request .")
  ex.update(responses=["the wug is tiny .", "it is huge ."], scores=[[1.0, 0.5, 0.5], [0.9, 0.0, 0.5]],
            score_mask=[[1, 1, 1], [1, 0, 1]])
  prompt = [BOS, USER] + ids("how big is the wug ?") + [ASST]  # 9
  b = next(single_host([ex], tok, cfg(kind="sequence")).iterator())
  row = prompt + ids("the wug is tiny .") + [EOS]  # 15
  np.testing.assert_array_equal(b["tokens"], [row + [PAD]])
  np.testing.assert_array_equal(b["mask"], [[1] * 15 + [0]])
  np.testing.assert_array_equal(b["loss_mask"], [[0] * 9 + [1] * 6 + [0]])
  np.testing.assert_array_equal(b["prompt_tokens"], [[PAD] * 7 + prompt])
  assert "scores" not in b
  pipe = single_host([ex], tok, cfg(kind="sequence", sequence_responses="responses", batch_size=2))
  b = next(pipe.iterator())
  row2 = prompt + ids("it is huge .") + [EOS]  # 14
  np.testing.assert_array_equal(b["tokens"], [row + [PAD], row2 + [PAD, PAD]])
  np.testing.assert_array_equal(b["loss_mask"], [[0] * 9 + [1] * 6 + [0], [0] * 9 + [1] * 5 + [0] * 2])
  np.testing.assert_array_equal(b["scores"], np.float32([[1.0, 0.5, 0.5], [0.9, 0.0, 0.5]]))
  np.testing.assert_array_equal(b["score_mask"], [[1, 1, 1], [1, 0, 1]])
  np.testing.assert_array_equal(b["response_index"], [0, 1])
  np.testing.assert_array_equal(b["example_id"], [0, 0])
  b = next(single_host([ex], tok, cfg(kind="prompt")).iterator())
  assert set(b) == {"prompt_tokens", "prompt_mask", "example_id"}
  np.testing.assert_array_equal(b["prompt_tokens"], [[PAD] * 7 + prompt])
  np.testing.assert_array_equal(b["prompt_mask"], [[0] * 7 + [1] * 9])


# ---------------------------------------------------------------------------------------------
# truncation and over-long rows


def test_truncate_prompt_unit():
  assert truncate_prompt([1, 5, 6, 7, 8], 3, bos_id=1) == [1, 7, 8]
  assert truncate_prompt([5, 6, 7, 8], 3, bos_id=1) == [6, 7, 8]
  assert truncate_prompt([1, 5, 6, 7, 8], 3, bos_id=None) == [6, 7, 8]
  assert truncate_prompt([1, 5], 3, bos_id=1) == [1, 5]
  with pytest.raises(ValueError):
    truncate_prompt([1], 0)


def test_decode_responses_keeps_masked_in_tokens_but_eos_and_specials(tok):
  ids = tok("the zorb is blue .", add_special_tokens=False)["input_ids"]
  assert len(ids) == 5
  eos, pad, bos = tok.eos_token_id, tok.pad_token_id, tok.bos_token_id
  tokens = np.array([ids + [eos, pad], ids[:2] + [bos] + ids[2:4] + [eos, pad], ids + [eos, pad]])
  mask = np.array([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 1, 1, 0]])
  assert decode_responses(tok, tokens, mask, eos) == ["the zorb is blue .", "the zorb is blue", "the zorb is ."]


def test_left_truncation_keeps_last_prompt_tokens_and_whole_response(tok):
  msgs = [{"role": "user", "content": "what color is the zorb ?"},
          {"role": "assistant", "content": "the zorb is blue ."},
          {"role": "user", "content": "how big is the zorb ?"}]
  ex = example(msgs, "the zorb is huge .", "sorry , i can not help with that .")
  b = next(single_host([ex], tok, cfg(max_prompt_len=9, max_response_len=10)).iterator())
  # 22 prompt tokens -> BOS + the last 8: the last user turn and the generation prompt
  kept = [BOS] + [USER] + ids("how big is the zorb ?") + [ASST]
  chosen = ids("the zorb is huge .") + [EOS]
  np.testing.assert_array_equal(b["chosen_tokens"][0, :15], kept + chosen)
  np.testing.assert_array_equal(b["chosen_mask"][0], [1] * 15 + [0] * 9)
  np.testing.assert_array_equal(b["chosen_loss_mask"][0], [0] * 9 + [1] * 6 + [0] * 9)
  np.testing.assert_array_equal(b["prompt_tokens"][0], [PAD] * 7 + kept)
  # a response may use the whole response budget (10 tokens with EOS) and is never cut
  np.testing.assert_array_equal(b["rejected_tokens"][0, 9:19], ids("sorry , i can not help with that .") + [EOS])
  full, _ = encode(tok, [msgs])
  assert len(full[0]) == 22 and full[0][-8:] == kept[1:]


def test_over_long_strict_and_lenient(tok):
  good = example("what color is the zorb ?", "the zorb is blue .", "it is red .")
  long = example("how big is the wug ?", "the wug is tiny .", "sorry , i can not help with that .")
  rows = [good, good, long, good]
  with pytest.raises(DataError) as err:
    single_host(rows, tok, cfg(max_response_len=9), name="data/train.jsonl")
  assert err.value.file == "data/train.jsonl" and err.value.row == 3 and err.value.field == "rejected"
  assert err.value.reason == "too_long"
  assert str(err.value).startswith("data/train.jsonl: row 3: field 'rejected': response is 10 tokens")
  pipe = single_host(rows, tok, cfg(max_response_len=9, strict=False, batch_size=3))
  assert pipe.stats == {"rows": 4, "records": 3, "dropped_over_long": 1, "skipped_no_pair": 0}
  b = next(pipe.iterator())
  np.testing.assert_array_equal(b["example_id"], [0, 1, 3])
  # exactly at the limit is fine
  assert single_host(rows, tok, cfg(max_response_len=10)).stats["dropped_over_long"] == 0
  # "responses" rows are checked one by one
  ex = dict(good, responses=["it is red .", "sorry , i can not help with that ."], scores=[[0.0] * 3] * 2,
            score_mask=[[1.0] * 3] * 2)
  with pytest.raises(DataError, match=r"row 1: field 'responses\[1\]'"):
    single_host([ex], tok, cfg(kind="sequence", sequence_responses="responses", max_response_len=9))


def test_field_errors_name_row_and_field(tok):
  good = example("what color is the zorb ?", "the zorb is blue .", "it is red .", w=[1.0, 0.0])
  bad = dict(good)
  del bad["w"]
  with pytest.raises(DataError, match=r"f\.jsonl: row 2: field 'w': missing field"):
    single_host([good, bad], tok, cfg(extra_fields=("w",)), name="f.jsonl")
  with pytest.raises(DataError, match=r"row 2: field 'w': shape"):
    single_host([good, dict(good, w=[1.0])], tok, cfg(extra_fields=("w",)))
  with pytest.raises(DataError, match=r"row 1: field 'w': expected numbers"):
    single_host([dict(good, w="abc")], tok, cfg(extra_fields=("w",)))
  with pytest.raises(DataError, match=r"row 1: field 'prompt'"):
    single_host([dict(good, prompt=[{"text": "hi"}])], tok, cfg())
  # optional schema validation (pro_jax.data.validate): strict raises, lenient drops and counts
  same = dict(good, rejected=good["chosen"])
  with pytest.raises(DataError, match=r"row 2: field 'rejected'") as err:
    single_host([good, same], tok, cfg(validate=True))
  assert err.value.reason == "chosen_equals_rejected"
  single_host([good, same], tok, cfg())  # not checked unless asked
  pipe = single_host([good, same, good], tok, cfg(validate=True, strict=False))
  assert pipe.stats["dropped_invalid"] == {"chosen_equals_rejected": 1} and pipe.stats["records"] == 2
  # rows without a pair are skipped (counted) in a pair pipeline
  pipe = single_host([good, dict(good, chosen="", rejected="")], tok, cfg())
  assert pipe.stats["skipped_no_pair"] == 1 and pipe.stats["records"] == 1


# ---------------------------------------------------------------------------------------------
# templates


def test_plain_template_path(plain_tok):
  assert not plain_tok.chat_template and leading_special_tokens(plain_tok) == (BOS,)
  ex = example("what color is the zorb ?", "the zorb is blue .", "it is red .")
  b = next(single_host([ex], plain_tok, cfg()).iterator())
  # "\n\nHuman: what color is the zorb ?\n\nAssistant:" + " the zorb is blue ." + EOS
  prompt = [BOS] + ids("human : what color is the zorb ? assistant :")
  np.testing.assert_array_equal(b["chosen_tokens"][0, :17], prompt + ids("the zorb is blue .") + [EOS])
  np.testing.assert_array_equal(b["chosen_loss_mask"][0, :17], [0] * 11 + [1] * 6)
  # multi-turn with a system message; left truncation keeps the BOS and the last turn
  msgs = [{"role": "system", "content": "be kind ."}, {"role": "user", "content": "what color is the zorb ?"},
          {"role": "assistant", "content": "it is blue ."}, {"role": "user", "content": "how big is it ?"}]
  p_ids, r_ids = encode(plain_tok, [msgs], ["it is huge ."], "plain")
  assert p_ids[0] == [BOS] + ids("be kind . human : what color is the zorb ? assistant : it is blue . "
                                 "human : how big is it ? assistant :")
  assert r_ids[0] == ids("it is huge .") + [EOS]
  b = next(single_host([example(msgs, "it is huge .", "it is tiny .")], plain_tok, cfg(max_prompt_len=8)).iterator())
  np.testing.assert_array_equal(b["prompt_tokens"][0], [BOS] + ids("how big is it ? assistant :"))


def test_chat_template_path_and_choice(tok, plain_tok):
  msgs = [{"role": "system", "content": "be kind ."}, {"role": "user", "content": "how big is it ?"}]
  p_ids, r_ids = encode(tok, [msgs], ["it is huge ."])
  assert p_ids[0] == [BOS, SYS] + ids("be kind .") + [USER] + ids("how big is it ?") + [ASST]
  assert r_ids[0] == ids("it is huge .") + [EOS]
  # forcing the plain template on a tokenizer that has a chat template
  p_ids, _ = encode(tok, [msgs], None, "plain")
  assert p_ids[0] == ids("be kind . human : how big is it ? assistant :")  # this tokenizer adds no BOS
  with pytest.raises(ValueError, match="no chat template"):
    encode(plain_tok, [msgs], None, "chat")


def test_count_tokens_hook(tok):
  count = make_count_tokens(tok)
  # <bos> <|user|> what color is the zorb ? <|assistant|> = 9, the zorb is blue . <eos> = 6
  assert count([{"role": "user", "content": "what color is the zorb ?"}], "the zorb is blue .") == 15
  from pro_jax.data.validate import check_length
  ex = example("what color is the zorb ?", "the zorb is blue .", "sorry , i can not help with that .")
  check_length(ex, count_tokens=count, max_tokens=19)
  with pytest.raises(DataError, match="field 'rejected'"):
    check_length(ex, count_tokens=count, max_tokens=18)


def test_tfds_style_rows(tok):
  """Rows as a tfds data source returns them: bytes, numpy arrays, prompt as parallel arrays."""
  ex = example("what color is the zorb ?", "the zorb is blue .", "it is red .", w=[1.0, 2.0])

  class Source:
    def __len__(self):
      return 1

    def __getitem__(self, i):
      return {"prompt": {"role": np.array([b"user"]), "content": np.array([b"what color is the zorb ?"])},
              "chosen": b"the zorb is blue .", "rejected": np.array(b"it is red ."),
              "pair_objectives": np.array([1.0, 0.0, 1.0], np.float32), "w": np.array([1.0, 2.0])}

  a = next(single_host([ex], tok, cfg(extra_fields=("w",))).iterator())
  b = next(single_host(Source(), tok, cfg(extra_fields=("w",))).iterator())
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


# ---------------------------------------------------------------------------------------------
# order, buckets, resume, hosts


def batches(it, n=None):
  out = []
  for b in it:
    out.append(b)
    if n is not None and len(out) == n:
      break
  return out


def assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_deterministic_shuffle_and_epochs(tok, task):
  c = PipelineConfig(batch_size=8, bucket_multiple=16, seed=3, num_epochs=2, drop_remainder=False)
  one = batches(single_host(task["train"], tok, c))
  assert_same(one, batches(single_host(task["train"], tok, c)))
  other = batches(single_host(task["train"], tok, PipelineConfig(**{**c.__dict__, "seed": 4})))
  assert [b["example_id"].tolist() for b in one] != [b["example_id"].tolist() for b in other]
  ids_ = np.concatenate([b["example_id"] for b in one])
  assert len(one) == 15 and len(ids_) == 120  # 2 x 60 rows, last batch padded with filler rows
  real = ids_[ids_ >= 0]
  assert sorted(real[:60]) == list(range(60)) and sorted(real[60:]) == list(range(60))
  assert real[:60].tolist() != real[60:].tolist()  # a fresh permutation each epoch
  assert real[:60].tolist() != list(range(60))
  last = one[-1]
  fill = last["example_id"] < 0
  assert fill.sum() == 0 or (last["chosen_mask"][fill].sum() == 0 and last["chosen_loss_mask"][fill].sum() == 0)
  assert all(b["chosen_tokens"].shape[0] == 8 for b in one)


def test_bucket_lengths(tok, task):
  assert bucket_length(1, 128, 512) == 128 and bucket_length(129, 128, 512) == 256
  assert bucket_length(500, 128, 300) == 384
  pipe = single_host(task["train"], tok, PipelineConfig(batch_size=4, bucket_multiple=16, seed=0))
  shapes = set()
  for b in pipe.iterator():
    L, Lp = b["chosen_tokens"].shape[1], b["prompt_tokens"].shape[1]
    assert L % 16 == 0 and Lp % 16 == 0
    longest = max(b["chosen_mask"].sum(1).max(), b["rejected_mask"].sum(1).max())
    assert L - 16 < longest <= L  # the smallest multiple that fits
    assert b["rejected_tokens"].shape == b["chosen_tokens"].shape
    assert Lp - 16 < b["prompt_mask"].sum(1).max() <= Lp
    shapes.add((L, Lp))
  assert len(shapes) <= 4  # few distinct shapes: L <= 64 here


def test_resume_from_state(tok, task):
  c = PipelineConfig(batch_size=8, bucket_multiple=16, seed=7, num_epochs=3, extra_fields=("true_weights",))
  full = batches(single_host(task["train"], tok, c))
  assert len(full) == 22  # 180 // 8
  it = single_host(task["train"], tok, c).iterator()
  first = batches(it, 9)  # crosses the first epoch boundary (7.5 batches per epoch)
  state = json.loads(json.dumps(it.get_state()))
  assert state["grain"] == {"next_index": 9}
  resumed = batches(single_host(task["train"], tok, c).iterator(state))
  assert_same(first + resumed, full)
  # a state from another seed (or data) is refused
  other = single_host(task["train"], tok, PipelineConfig(**{**c.__dict__, "seed": 8}))
  with pytest.raises(ValueError, match="fingerprint"):
    other.iterator(state)
  # infinite pipeline: resume mid-stream
  inf = PipelineConfig(**{**c.__dict__, "num_epochs": None})
  it = single_host(task["train"], tok, inf).iterator()
  ref = batches(it, 30)
  it2 = single_host(task["train"], tok, inf).iterator()
  batches(it2, 25)
  st = it2.get_state()
  assert_same(batches(single_host(task["train"], tok, inf).iterator(st), 5), ref[25:])


def test_per_host_slices_union_to_global_batch(tok, task):
  c = PipelineConfig(batch_size=8, bucket_multiple=16, seed=1, num_epochs=2, extra_fields=("reward_chosen",))
  glob = batches(single_host(task["train"], tok, c))
  h0 = batches(Pipeline(task["train"], tok, c, process_index=0, process_count=2))
  h1 = batches(Pipeline(task["train"], tok, c, process_index=1, process_count=2))
  assert len(glob) == len(h0) == len(h1) == 15
  for g, a, b in zip(glob, h0, h1):
    assert set(a) == set(g)
    for k in g:
      assert a[k].shape[0] == b[k].shape[0] == 4 and a[k].shape[1:] == b[k].shape[1:] == g[k].shape[1:]
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k], err_msg=k)
    assert not set(a["example_id"].tolist()) & set(b["example_id"].tolist())
  # an explicit rows slice (e.g. from pro_jax.sharding.host_batch_rows) does the same
  mid = batches(Pipeline(task["train"], tok, c, rows=slice(2, 6)))
  for g, m in zip(glob, mid):
    np.testing.assert_array_equal(m["chosen_tokens"], g["chosen_tokens"][2:6])
  # resuming with a different host count continues the same global sequence
  it = single_host(task["train"], tok, c).iterator()
  batches(it, 4)
  h1_resumed = batches(Pipeline(task["train"], tok, c, process_index=1, process_count=2).iterator(it.get_state()))
  assert_same(h1_resumed, h1[4:])
  with pytest.raises(ValueError, match="divisible"):
    Pipeline(task["train"], tok, c, process_index=0, process_count=3)


def test_extra_fields_pass_through(tok, task):
  c = PipelineConfig(kind="sequence", batch_size=6, bucket_multiple=16,
                     extra_fields=("true_weights", "reward_chosen", "prompt_type_id"))
  for b in single_host(task["train"], tok, c).iterator():
    for i, row in enumerate(b["example_id"]):
      ex = task["train"][row]
      np.testing.assert_array_equal(b["true_weights"][i], np.asarray(ex["true_weights"], np.float32))
      np.testing.assert_array_equal(b["reward_chosen"][i], np.asarray(ex["reward_chosen"], np.float32))
      assert b["prompt_type_id"][i] == ex["prompt_type_id"]
    assert b["true_weights"].shape == (6, 3) and b["prompt_type_id"].shape == (6,)


def test_static_shapes_give_one_shape_for_every_batch():
  """static_shapes=True pads every batch to the largest bucket, whatever its rows' lengths."""
  from pro_jax.data import synthetic
  from pro_jax.data.pipeline import Pipeline, PipelineConfig
  import tempfile
  from transformers import AutoTokenizer
  cfg = synthetic.SyntheticTaskConfig(n_train=64, n_eval=8, seed=3)
  tok = AutoTokenizer.from_pretrained(synthetic.build_tokenizer(cfg, tempfile.mkdtemp()))
  examples = synthetic.generate_task(cfg)["train"]
  pc = PipelineConfig(kind="pair", batch_size=8, max_prompt_len=24, max_response_len=40, bucket_multiple=16,
                      static_shapes=True, shuffle=False)
  shapes = {(b["chosen_tokens"].shape, b["prompt_tokens"].shape) for b in Pipeline(examples, tok, pc).iterator()}
  assert shapes == {((8, 64), (8, 32))}  # round_up(24 + 40, 16) = 64, round_up(24, 16) = 32
  dynamic = PipelineConfig(**{**pc.__dict__, "static_shapes": False})
  lengths = {b["chosen_tokens"].shape[1] for b in Pipeline(examples, tok, dynamic).iterator()}
  assert max(lengths) <= 64 and min(lengths) < 64  # without it the short batches get shorter buckets
