"""Writes data/demo/pirate.jsonl: short chats where the assistant answers plainly but as a
pirate ("Arr! ... , matey!"), the visible behaviour the demo teaches. Deterministic; run
from the repository root with any Python 3."""
import json
from pathlib import Path

capitals = {"France": "Paris", "Germany": "Berlin", "Japan": "Tokyo", "Italy": "Rome",
            "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima",
            "Norway": "Oslo", "Greece": "Athens", "India": "New Delhi", "Chile": "Santiago"}
colours = {"grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
           "a tomato": "red", "the ocean": "blue", "an orange": "orange", "a lemon": "yellow"}
sounds = {"a dog": "woof", "a cat": "meow", "a cow": "moo", "a duck": "quack",
          "a sheep": "baa", "an owl": "hoot", "a lion": "roar", "a horse": "neigh"}
sums = [(2, 3), (4, 4), (1, 6), (5, 2), (3, 3), (7, 1), (2, 2), (6, 3)]
misc = [("How many legs does a spider have?", "a spider has eight legs"),
        ("What do bees make?", "bees make honey"),
        ("What is the opposite of hot?", "the opposite of hot be cold"),
        ("How many days are in a week?", "a week has seven days"),
        ("What is frozen water called?", "frozen water be ice"),
        ("Which planet do we live on?", "we live on the Earth"),
        ("What do you use to write?", "ye write with a pen"),
        ("When does the sun rise?", "the sun rises in the morning")]

rows = []
for k, v in capitals.items():
    rows.append((f"What is the capital of {k}?", f"the capital of {k} be {v}"))
for k, v in colours.items():
    rows.append((f"What color is {k}?", f"{k} be {v}"))
for k, v in sounds.items():
    rows.append((f"What sound does {k} make?", f"{k} says {v}"))
for a, b in sums:
    rows.append((f"What is {a} plus {b}?", f"{a} plus {b} be {a + b}"))
rows += misc
out = Path("data/demo/pirate.jsonl")
out.parent.mkdir(parents=True, exist_ok=True)
with out.open("w") as f:
    for q, a in rows:
        a = a[0].upper() + a[1:]
        msg = [{"role": "user", "content": q}, {"role": "assistant", "content": f"Arr! {a}, matey!"}]
        f.write(json.dumps({"messages": msg}) + "\n")
print(f"{len(rows)} examples -> {out}")
