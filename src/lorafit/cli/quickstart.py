"""The quickstart: teach SmolLM2 a pirate persona on CPU in a few minutes, and show before/after.

The dataset is generated here (no download): everyday questions whose answers are plain facts
restated the pirate way ("Arr, matey! ... Yo-ho-ho!"). The change is easy to see on questions the
model never trained on, which is the point: LoRA learned a style, not a lookup table.
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

from lorafit.atomic import replacing_dir, write_json, write_text

FACTS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many legs does a dog have?", "A dog has four legs."),
    ("How many continents are there?", "There are seven continents."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What do bees make?", "Bees make honey."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    (
        "Which animal is known as the king of the jungle?",
        "The lion is known as the king of the jungle.",
    ),
    ("What is the largest ocean?", "The Pacific is the largest ocean."),
    ("What do plants need to grow?", "Plants need sunlight, water and soil to grow."),
    ("What is two plus two?", "Two plus two is four."),
    ("What is ten minus three?", "Ten minus three is seven."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("What do cows drink?", "Cows drink water."),
    ("Where does the sun rise?", "The sun rises in the east."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("How many hours are in a day?", "There are twenty-four hours in a day."),
    ("What do you call a baby cat?", "A baby cat is called a kitten."),
    ("What is the tallest animal?", "The giraffe is the tallest animal."),
    ("What gas do people breathe in?", "People breathe in oxygen."),
    ("What is the boiling point of water?", "Water boils at one hundred degrees Celsius."),
    ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
    ("What is the main language of Brazil?", "The main language of Brazil is Portuguese."),
    ("What shape has three sides?", "A triangle has three sides."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What do fish use to breathe?", "Fish breathe with their gills."),
    ("What is the color of grass?", "Grass is green."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What instrument has black and white keys?", "The piano has black and white keys."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    ("Can you recommend a healthy breakfast?", "Oatmeal with fruit is a healthy breakfast."),
    ("How do I stay cool in summer?", "Drink plenty of water and stay in the shade."),
    (
        "Give me a tip for learning to code.",
        "Write a little code every day and read the errors carefully.",
    ),
    ("What should I pack for a beach trip?", "Pack sunscreen, a towel, water and a hat."),
]
ASK = [
    "{q}",
    "Tell me: {q}",
    "Quick question. {q}",
    "{q} Please answer briefly.",
    "I wonder, {q_lower}",
]
# Held out: never in the training data, so the tuned answers show the persona generalising.
DEMO_PROMPTS = [
    "What is the capital of Germany?",
    "How many legs does a spider have?",
    "Give me a tip for sleeping well.",
]
_PIRATE_WORDS = [
    (r"\bis\b", "be"),
    (r"\bare\b", "be"),
    (r"\byou\b", "ye"),
    (r"\byour\b", "yer"),
    (r"\bmy\b", "me"),
    (r"\bthe sea\b", "the briny deep"),
]


def pirate(answer: str) -> str:
    for pattern, repl in _PIRATE_WORDS:
        answer = re.sub(pattern, repl, answer)
    return f"Arr, matey! {answer} Yo-ho-ho!"


def write_dataset(path: Path, seed: int = 0) -> Path:
    """The pirate dataset as chat-messages JSONL: each fact asked in every phrasing."""
    rng = random.Random(seed)
    rows = []
    for question, answer in FACTS:
        for template in ASK:
            q = template.format(q=question, q_lower=question[0].lower() + question[1:])
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": pirate(answer)},
                    ]
                }
            )
    rng.shuffle(rows)
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(out: str = "runs/quickstart", steps: int = 60, model: str = "smollm2") -> dict:
    """Generate the data, show the base model's answers, fine-tune, show the tuned answers."""
    import torch

    from lorafit.infer import generate
    from lorafit.models import load_model
    from lorafit.train import train
    from lorafit.train.config import build_run_config
    from lorafit.tuner import load_adapter

    started = time.perf_counter()
    out_dir = Path(out)
    data = write_dataset(out_dir / "pirate.jsonl")
    print(f"dataset: {data} ({len(FACTS) * len(ASK)} chats)")
    base, tokenizer = load_model(model)
    before = generate(base, tokenizer, DEMO_PROMPTS, max_new_tokens=40)
    del base
    raw = {
        "model": {"name": model},
        "data": {"train": str(data), "val_fraction": 0.1, "max_length": 128},
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        "train": {
            "max_steps": steps,
            "batch_size": 8,
            "lr": 2e-3,
            "warmup_ratio": 0.1,
            "eval_every": 20,
            "save_every": 0,
        },
    }
    with replacing_dir(out_dir / "run") as run_dir:  # a fresh demo; the old run kept until done
        raw["train"]["output_dir"] = str(run_dir)
        result = train(build_run_config(raw, "quickstart"))
    adapter_dir = result.adapter_dir
    tuned, tokenizer = load_model(model)
    load_adapter(tuned, adapter_dir)
    with torch.no_grad():
        after = generate(tuned, tokenizer, DEMO_PROMPTS, max_new_tokens=40)
    print("\n=== before / after (prompts not in the training data) ===")
    for prompt, b, a in zip(DEMO_PROMPTS, before, after):
        print(f"\n> {prompt}\n  base:  {b}\n  tuned: {a}")
    report = {
        "wall_time_s": round(time.perf_counter() - started, 1),
        "steps": result.steps,
        "final": result.final,
        "adapter": str(adapter_dir),
        "samples": [
            {"prompt": p, "before": b, "after": a} for p, b, a in zip(DEMO_PROMPTS, before, after)
        ],
    }
    write_json(out_dir / "quickstart.json", report)
    print(f"\nquickstart finished in {report['wall_time_s']}s; adapter in {adapter_dir}")
    print(f"chat with it: lorafit generate --adapter {adapter_dir}")
    return report
