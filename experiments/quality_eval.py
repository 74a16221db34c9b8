"""Evaluation of one fine-tuned model in the quality experiment.

Input: a causal LM (in memory), its tokenizer, the held-out shard directory (built by
`sftgo-prep build` with every strategy, so it carries all group columns) with the records'
answers, and the held-out questions.
Output (`evaluate_model`): a dict of
  em            exact match: greedy answer to the held-out question contains the fact's value;
  tf_acc        teacher-forced: every token of the value is the model's argmax in the reference response;
  answer_loss   mean CE over the value's tokens in the held-out responses (the known important tokens);
  rest_loss     mean CE over the other supervised tokens;  ce: over all supervised tokens;
  group_loss    {strategy: [loss of group 0, loss of group 1, ...]} under each shard grouping;
  answers       the generated answers (for the report's examples).
Cost: one no-grad forward over the held-out shards and one batched greedy generation of at
most `max_new_tokens` tokens per question: a few seconds for 45 questions on 2 CPU cores.
"""

from __future__ import annotations

import glob

import numpy as np
import pyarrow.parquet as pq
import torch
from quality_data import exact_match


def answer_positions(ids: list[int], mask: list[int], answer: str, tokenizer) -> list[int]:
    """Positions of the answer's tokens (tokenized with and without a leading space, as it may stand
    mid-sentence or after a newline): the first occurrence inside the supervised span."""
    variants = [tokenizer.encode(p + answer, add_special_tokens=False) for p in (" ", "")]
    for var in variants:
        n = len(var)
        for s in range(len(ids) - n + 1):
            if mask[s] and ids[s : s + n] == var:
                return list(range(s, s + n))
    return []


def read_answered_rows(shard_dir: str, answers: dict[str, str], tokenizer) -> list[dict]:
    """Rows of a shard directory, each with `answer_pos`, its answer's token positions (empty where not found)."""
    rows = []
    for path in sorted(glob.glob(f"{shard_dir}/shard-*.parquet")):
        rows += pq.read_table(path).to_pylist()
    out = []
    for r in rows:
        r["answer_pos"] = answer_positions(r["input_ids"], r["loss_mask"], answers[r["id"]], tokenizer)
        out.append(r)
    return out


@torch.no_grad()
def teacher_forced(model, rows: list[dict], strategies: list[str], batch: int = 16) -> dict:
    sums = {s: np.zeros(2) for s in strategies}
    counts = {s: np.zeros(2) for s in strategies}
    ans_sum = ans_n = rest_sum = rest_n = 0.0
    correct = 0
    found = 0
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        att = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            att[j, : len(r["input_ids"])] = 1
        logits = model(input_ids=ids, attention_mask=att).logits.float()
        for j, r in enumerate(chunk):
            n = len(r["input_ids"])
            tgt = torch.tensor(r["input_ids"][1:n])
            lp = torch.log_softmax(logits[j, : n - 1], -1)
            ce = -lp.gather(1, tgt[:, None])[:, 0].numpy()  # ce[t] is the loss of token t+1
            argmax_ok = (lp.argmax(-1) == tgt).numpy()
            mask = np.asarray(r["loss_mask"][1:n], bool)
            is_ans = np.zeros(n - 1, bool)
            if r["answer_pos"]:
                found += 1
                pos = np.asarray(r["answer_pos"]) - 1
                is_ans[pos] = True
                correct += bool(argmax_ok[pos].all())
            ans_sum += ce[is_ans].sum()
            ans_n += is_ans.sum()
            rest = mask & ~is_ans
            rest_sum += ce[rest].sum()
            rest_n += rest.sum()
            for s in strategies:
                g = np.asarray(r[f"group_{s}"][1:n])
                for k in (0, 1):
                    sel = g == k
                    sums[s][k] += ce[sel].sum()
                    counts[s][k] += sel.sum()
    return {
        "tf_acc": correct / max(found, 1),
        "answer_loss": ans_sum / max(ans_n, 1),
        "rest_loss": rest_sum / max(rest_n, 1),
        "ce": (ans_sum + rest_sum) / max(ans_n + rest_n, 1),
        "answers_found": found,
        "heldout_rows": len(rows),
        "group_loss": {s: (sums[s] / np.maximum(counts[s], 1)).tolist() for s in strategies},
    }


@torch.no_grad()
def generate_answers(model, tokenizer, questions: list[str], max_new_tokens: int = 40, batch: int = 48) -> list[str]:
    """Greedy answers to single-turn questions, through the model's chat template."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        for i in range(0, len(questions), batch):
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
                )
                for q in questions[i : i + batch]
            ]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in out]


def evaluate_model(model, tokenizer, heldout_rows: list[dict], questions: list[dict], strategies: list[str]) -> dict:
    model.eval()
    res = teacher_forced(model, heldout_rows, strategies)
    answers = generate_answers(model, tokenizer, [q["instruction"] for q in questions])
    hits = [exact_match(a, q["meta"]["answer"]) for a, q in zip(answers, questions)]
    res["em"] = sum(hits) / len(hits)
    res["answers"] = [
        {"question": q["instruction"], "answer": q["meta"]["answer"], "generated": a, "hit": h}
        for q, a, h in zip(questions, answers, hits)
    ]
    return res
