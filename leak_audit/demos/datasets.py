"""Data for examples, tests and benchmarks.

* :func:`read_tsv` reads a TSV with ``sentence`` and ``label`` columns (GLUE CoLA / SST-2 layout).
* :func:`load_images` reads images and labels from an ``.npz`` (e.g. CIFAR-10 test images).
* :func:`synthetic_pii_dataset` generates, from a seed, support tickets and clinical notes that carry
  fake personal data (names, e-mails, phone numbers, card digits, dates of birth, record numbers), made
  with `Faker <https://faker.readthedocs.io>`_. Label 1 = urgent, 0 = routine. It is the demo's default:
  it needs nothing from outside, and it is exactly the kind of text an auditor worries about.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["load_images", "read_tsv", "synthetic_pii_dataset"]

_ROUTINE = (
    "Hi, this is {name}. Please update the email on my account to {email}, thanks.",
    "Could you send the March invoice for account {account} to {email}? Regards, {first}.",
    "{name} here, I moved to {street}, {city}. Please change my shipping address.",
    "Patient {name}, DOB {dob}, MRN {mrn}, seen for routine follow-up; blood pressure stable.",
    "{name} ({dob}) requests a refill of {drug} {dose} mg. Pharmacy phone {phone}.",
    "Reminder for {name}: annual checkup on {date} with Dr. {doctor}, MRN {mrn}.",
)
_URGENT = (
    "URGENT: my card ending {card} was charged twice today. Call me at {phone}. {name}",
    "Someone logged into account {account} from {city}. Please lock it now! {name}, {phone}",
    "Patient {name}, MRN {mrn}, reports chest pain since this morning; refer to emergency now.",
    "{name}, DOB {dob}, severe allergic reaction to {drug}; call {phone} immediately.",
    "I cannot access my account {account} and rent is due today. Please help, {name}, {email}",
    "Dr. {doctor}: {name} (MRN {mrn}) has a fever of 40 C after surgery, please review urgently.",
)
_DRUGS = ("amoxicillin", "lisinopril", "metformin", "ibuprofen", "atorvastatin", "warfarin", "insulin")


def synthetic_pii_dataset(n: int = 256, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` (sentence, label) pairs with fake personal data, reproducible from ``seed``.

    Raises:
        ValueError: ``n < 1``.
        ImportError: Faker is not installed (``pip install 'leak-audit[examples]'``).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    try:
        from faker import Faker
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("synthetic_pii_dataset needs Faker: pip install 'leak-audit[examples]'") from exc
    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        template = rng.choice(_URGENT if label else _ROUTINE)
        first, last = fake.first_name(), fake.last_name()
        fields = {
            "name": f"{first} {last}",
            "first": first,
            "email": fake.email(),
            "phone": fake.numerify("###-###-####"),
            "card": fake.numerify("####"),
            "account": fake.bothify("??-######").upper(),
            "street": fake.street_address(),
            "city": fake.city(),
            "dob": fake.date_of_birth(minimum_age=18, maximum_age=90).strftime("%m/%d/%Y"),
            "date": fake.date_between(start_date="+1d", end_date="+90d").strftime("%B %d"),
            "mrn": fake.numerify("#######"),
            "drug": rng.choice(_DRUGS),
            "dose": rng.choice((5, 10, 20, 250, 500)),
            "doctor": fake.last_name(),
        }
        rows.append((template.format(**fields), label))
    return rows


def read_tsv(path: str | Path, limit: int | None = None) -> list[tuple[str, int]]:
    """Rows ``(sentence, label)`` of a TSV with a header naming ``sentence`` and ``label`` columns.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a column is missing, or a label is not an integer (the message gives the line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    rows = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"sentence", "label"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} lacks column(s) {sorted(missing)}; found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                rows.append((row["sentence"].strip(), int(row["label"])))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line}: label {row.get('label')!r} is not an integer") from exc
            if limit is not None and len(rows) >= limit:
                break
    return rows


def load_images(path: str | Path, n: int | None = None, *, last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels from an ``.npz`` holding ``images`` (uint8 ``[N, H, W, C]`` or ``[N, H, W]``) and
    ``labels`` (``[N]``).

    Args:
        path: the ``.npz`` file.
        n: the first ``n`` images (``last``: the last ``n``); ``None``: all of them.
        last: take the images from the end of the file.

    Returns:
        ``(images, labels)``: ``[n, C, H, W]`` float32 in ``[0, 1]`` (one channel for ``[N, H, W]``) and
        ``[n]`` int64.

    Raises:
        ValueError: the file is unreadable or lacks ``images``/``labels``, the arrays have the wrong dtype
            or shapes, or ``n`` exceeds the images in the file; the message starts with ``path``.
    """
    import numpy as np
    import torch

    try:
        data = np.load(path)
        images, labels = data["images"], data["labels"]
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: needs an .npz with 'images' (uint8 [N, H, W, C]) and 'labels' ({exc})") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or labels.shape != images.shape[:1]:
        raise ValueError(f"{path}: images must be uint8 [N, H, W(, C)] with one label each, got "
                         f"{images.dtype} {images.shape} and labels {labels.shape}")
    count = len(images) if n is None else n
    if count > len(images):
        raise ValueError(f"{path}: {count} images asked for, the file holds {len(images)}")
    part = slice(len(images) - count, None) if last else slice(0, count)
    x = torch.from_numpy(images[part]).float() / 255
    x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.from_numpy(labels[part].astype(np.int64))
