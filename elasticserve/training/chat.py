"""Chat distillation data written by the teacher itself, and how to read it back as token ids.

The prompt set mixes three sources, none downloaded: a list of requests written for this project
(`SEED_PROMPTS`), requests the full shape writes when asked for one about a topic (data-free, as
LLM-QAT generates its own data), and tasks over passages of the user's text (summarise, explain,
continue, rewrite). The full shape answers each through the chat template, batched in the engine;
the records (JSONL) carry the conversation, where the prompt came from and its split, so a set is
written once, inspected, and reused by fine-tuning (`--chat-data`) and evaluation (`eval --chat`).
"""

from __future__ import annotations

import json
import os
import random
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..engine.llm_engine import EngineConfig, LLMEngine
from ..engine.sampling import SamplingParams
from ..model.bundle import ModelBundle
from .data import PathLike, text_files

SEED_PROMPTS = (
    "What is the capital of France?",
    "Explain why the sky is blue in simple words.",
    "Give me three tips for a job interview.",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "What is the difference between weather and climate?",
    "Write a Python function that returns the sum of a list of numbers.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "What are the health benefits of walking every day?",
    "Translate 'good morning, how are you?' into French.",
    "Explain what a black hole is.",
    "How can I save money on groceries?",
    "Write a friendly email inviting a colleague to lunch.",
    "What causes the seasons on Earth?",
    "List five fruits that are high in vitamin C.",
    "How does a bicycle stay upright?",
    "What is photosynthesis?",
    "Give me a recipe for a simple tomato soup.",
    "Why do cats purr?",
    "Explain the rules of chess briefly.",
    "What should I pack for a weekend camping trip?",
    "Write a story about a robot who learns to paint, in one paragraph.",
    "How do vaccines work?",
    "What is 15% of 80? Show your working.",
    "Describe the water cycle.",
    "What are some good habits for studying?",
    "Explain what an API is to a beginner.",
    "How do I make my houseplants grow better?",
    "What was the Industrial Revolution?",
    "Give me a motivational quote and explain it.",
    "How do airplanes fly?",
    "What is the difference between a virus and a bacterium?",
    "Write a haiku about autumn leaves.",
    "How can I improve my sleep?",
    "Explain the meaning of 'supply and demand'.",
    "What are the planets of the solar system?",
    "Suggest a name for a new coffee shop and say why.",
    "How do I write a good cover letter?",
    "What is machine learning?",
    "Why is exercise good for mental health?",
    "Write a thank-you note to a teacher.",
    "How does the internet work, in a few sentences?",
    "What is the tallest mountain in the world?",
    "Explain recursion with an example.",
    "What are some ways to reduce stress at work?",
    "Describe a sunset to someone who has never seen one.",
    "How do I change a flat tyre?",
    "What is democracy?",
    "Give me three ideas for a birthday party.",
    "Why do leaves change colour in the autumn?",
    "Write a SQL query that counts the rows of a table named orders.",
    "What is the Pythagorean theorem?",
    "How do bees make honey?",
    "What is a healthy breakfast?",
    "Explain the difference between 'affect' and 'effect'.",
    "How do I start learning to play the guitar?",
    "What happened during the French Revolution?",
    "Write a short dialogue between a customer and a shopkeeper.",
    "How does a refrigerator keep food cold?",
    "What are renewable energy sources?",
)

TOPICS = (
    "cooking",
    "history",
    "physics",
    "gardening",
    "travel",
    "programming",
    "personal finance",
    "health",
    "music",
    "literature",
    "mathematics",
    "animals",
    "geography",
    "sports",
    "space",
    "art",
    "careers",
    "friendship",
    "the weather",
    "technology",
    "chemistry",
    "languages",
    "films",
    "education",
    "the ocean",
    "cars",
    "philosophy",
    "home repair",
    "fashion",
    "biology",
)

ASK_FOR_A_PROMPT = (
    "Write one question that a person might ask an AI assistant about {topic}. "
    "Reply with the question only."
)

PASSAGE_TASKS = (
    "Summarize this passage in two sentences:\n\n{passage}",
    "What is happening in this passage?\n\n{passage}",
    "Rewrite this passage in plain modern English:\n\n{passage}",
    "Continue this story for a few sentences:\n\n{passage}",
    "Who are the people in this passage, and how do they feel?\n\n{passage}",
)

SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class ChatPrompt:
    source: str  # "seed" | "self" | "passage"
    text: str


def passage_prompts(
    paths: Sequence[PathLike], count: int, seed: int, exclude: Sequence[str] = ()
) -> list[ChatPrompt]:
    """`count` tasks over passages of ~120 words drawn evenly from the text files."""
    words: list[str] = []
    for file in text_files(paths):
        if file.name not in exclude:
            words += file.read_text(encoding="utf-8", errors="replace").split()
    size = 120
    if count <= 0 or len(words) < size:
        return []
    rng = random.Random(seed)
    stride = max(1, (len(words) - size) // count)
    out = []
    for i in range(count):
        passage = " ".join(words[i * stride : i * stride + size])
        out.append(ChatPrompt("passage", rng.choice(PASSAGE_TASKS).format(passage=passage)))
    return out


def _clean_question(text: str) -> str | None:
    """The first line of a written request, unquoted; None when it is not a usable request."""
    line = text.strip().split("\n", 1)[0].strip().strip('"').strip()
    return line if 12 <= len(line) <= 300 and any(c.isalpha() for c in line) else None


def chat_ids(tokenizer: PreTrainedTokenizerBase, user: str) -> list[int]:
    """The prompt ids of one user message through the chat template, ready to answer."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _generate(
    engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]
) -> list[Any]:
    """Every prompt's finished CompletionOutput, in order, batched by the engine."""
    ids = [engine.add_request(p, s, "full") for p, s in zip(prompts, params, strict=True)]
    done: dict[str, Any] = {}
    while len(done) < len(ids):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
    return [done[i] for i in ids]


def self_prompts(engine: LLMEngine, count: int, seed: int) -> list[ChatPrompt]:
    """Up to `count` distinct requests the full shape writes, one topic each (sampled at T=1)."""
    tok = engine.tokenizer
    rng = random.Random(seed)
    topics = [TOPICS[i % len(TOPICS)] for i in range(count * 2)]  # twice: some are unusable
    rng.shuffle(topics)
    asks = [chat_ids(tok, ASK_FOR_A_PROMPT.format(topic=t)) for t in topics]
    params = [
        SamplingParams(temperature=1.0, top_p=0.95, max_tokens=48, seed=seed * 100_003 + i)
        for i in range(len(asks))
    ]
    seen: set[str] = set()
    out: list[ChatPrompt] = []
    for gen in _generate(engine, asks, params):
        question = _clean_question(gen.text)
        if question and question.lower() not in seen and len(out) < count:
            seen.add(question.lower())
            out.append(ChatPrompt("self", question))
    return out


def split_of(text: str, heldout: float) -> str:
    """A prompt's split, fixed by its text (a stable hash), so reruns agree."""
    return "heldout" if zlib.crc32(text.encode()) % 10_000 < heldout * 10_000 else "train"


def distill_records(
    engine: LLMEngine,
    prompts: Sequence[ChatPrompt],
    max_tokens: int,
    temperature: float,
    seed: int,
    heldout: float,
) -> list[dict[str, Any]]:
    """The full shape's answer to every prompt, as JSONL-ready records."""
    ids = [chat_ids(engine.tokenizer, p.text) for p in prompts]
    params = [
        SamplingParams(
            temperature=temperature, top_p=0.9, max_tokens=max_tokens, seed=seed * 7919 + i
        )
        for i in range(len(prompts))
    ]
    records = []
    for i, (prompt, gen) in enumerate(zip(prompts, _generate(engine, ids, params), strict=True)):
        records.append(
            {
                "id": i,
                "source": prompt.source,
                "split": split_of(prompt.text, heldout),
                "messages": [
                    {"role": "user", "content": prompt.text},
                    {"role": "assistant", "content": gen.text},
                ],
                "finish_reason": gen.finish_reason,
            }
        )
    return records


def build_distill_set(
    bundle: ModelBundle,
    data: Sequence[PathLike] = (),
    exclude: Sequence[str] = (),
    seed_prompts: int = len(SEED_PROMPTS),
    self_count: int = 60,
    passage_count: int = 60,
    max_tokens: int = 256,
    temperature: float = 0.7,
    heldout: float = 0.15,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Prompts from the three sources, answered by the full shape."""
    engine = LLMEngine(bundle, EngineConfig())  # one engine (one KV cache) for both passes
    prompts = [ChatPrompt("seed", p) for p in SEED_PROMPTS[:seed_prompts]]
    if self_count:
        prompts += self_prompts(engine, self_count, seed)
    if data and passage_count:
        prompts += passage_prompts(data, passage_count, seed, exclude)
    if not prompts:
        raise ValueError("no prompts: ask for seed, self-written or passage prompts")
    return distill_records(engine, prompts, max_tokens, temperature, seed, heldout)


def write_jsonl(records: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> int:
    """Write records one JSON object per line; returns how many."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_chat(path: str | os.PathLike[str], split: str | None = None) -> list[dict[str, Any]]:
    """The records of a chat JSONL (one split, or all); a malformed line raises with its number."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    records = []
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                roles = [m["role"] for m in record["messages"]]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: not a chat record ({e})") from None
            if roles[-1:] != ["assistant"] or len(roles) < 2:
                raise ValueError(f"{path}:{number}: the last message must be the assistant's")
            if split is None or record.get("split", "train") == split:
                records.append(record)
    return records


def conversation_ids(
    tokenizer: PreTrainedTokenizerBase, record: dict[str, Any]
) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a record: the conversation before the last message through
    the chat template, then the answer's tokens, closed by the end-of-turn token when the answer
    ended on it."""
    messages = record["messages"]
    text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    prompt = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    answer = list(tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"])
    if record.get("finish_reason", "stop") == "stop" and tokenizer.eos_token_id is not None:
        answer.append(tokenizer.eos_token_id)
    return prompt, answer


def chat_stream(tokenizer: PreTrainedTokenizerBase, records: Iterable[dict[str, Any]]) -> list[int]:
    """Every conversation's ids, prompt then answer, one after another: the fine-tuning stream."""
    ids: list[int] = []
    for record in records:
        prompt, answer = conversation_ids(tokenizer, record)
        ids += prompt + answer
    return ids
