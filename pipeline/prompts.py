"""Attribute-extraction prompts generated from the taxonomy, in English or Chinese.

The answer is one JSON object: "category" first, then the global attributes, then the chosen
category's own attributes, then "summary". The shared instructions come before the image, so
their key/value cache is computed once per worker and reused by every batch; only the image and a
short tail are prefilled per item.

prompt_version hashes everything that shapes the model's input: the template, the language, the
taxonomy version and the summary settings. Changing any of them makes a nightly run re-tag.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from schemas.taxonomy import CATEGORY, SUMMARY, Attribute, Language, Taxonomy

TEMPLATE_REVISION = "2026-12-04.1"  # bump when the wording below changes

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"

_TEXT = {
    "en": {
        "system": (
            "You are a product catalog assistant for an online fashion store. You look at one product "
            "photo and tag the product with the store's attributes, choosing only from the allowed values."
        ),
        "task": (
            'Tag the product in the photo. Answer with one JSON object: "category" first, then the '
            'attributes listed for that category in the order given, then "summary".'
        ),
        "task_without_summary": (
            'Tag the product in the photo. Answer with one JSON object: "category" first, then the '
            "attributes listed for that category in the order given."
        ),
        "categories": "category, one of",
        "global": "Attributes asked for every category, in this order, with their allowed values",
        "per_category": "Then each category's own attributes, in this order, with the values allowed for it",
        "none": "(no further attributes)",
        "summary": (
            "summary: one sentence describing the product's cut, color, neckline, sleeve length and "
            "style, at most {max_chars} characters."
        ),
        "question": "Tag this product.",
    },
    "zh": {
        "system": "你是一家服装电商的商品目录助手。你会看一张商品图片，并只用允许的取值为商品打上店铺的属性标签。",
        "task": (
            '请为图片中的商品打标签。只输出一个JSON对象：先写"category"，再按顺序写该品类对应的属性，最后写"summary"。'
        ),
        "task_without_summary": (
            '请为图片中的商品打标签。只输出一个JSON对象：先写"category"，再按顺序写该品类对应的属性。'
        ),
        "categories": "category（品类），取值之一",
        "global": "所有品类都要回答的属性（按此顺序）及其允许的取值",
        "per_category": "然后是每个品类自己的属性（按此顺序）及该品类允许的取值",
        "none": "（没有其他属性）",
        "summary": (
            "summary：请根据图片描述服装的款式、颜色、领型、袖长和风格特点，用一句话概括，不超过{max_chars}个字。"
        ),
        "question": "请为这件商品打标签。",
    },
}


@dataclass(frozen=True)
class PromptText:
    """The prompt around the image; prefix is shared by every item and cached."""

    prefix: str
    after_image: str
    language: Language
    version: str


def _values(attribute: Attribute, language: Language) -> str:
    return ", ".join(value.label(language) for value in attribute.values)


def instructions(taxonomy: Taxonomy, language: Language, summary_chars: int | None) -> str:
    """The task, then every value list the model may answer from: a category's own attributes are
    listed with that category's subset (a T-shirt's necklines, not every neckline), so a value the
    model would prefer is never masked without the prompt having said so."""
    text = _TEXT[language]
    task = text["task"] if summary_chars else text["task_without_summary"]
    lines = [task, "", f"{text['categories']}: {_values(taxonomy.category_attribute, language)}", ""]
    lines.append(f"{text['global']}:")
    lines += [f"- {_attribute_line(attribute, language)}" for attribute in taxonomy.global_attributes]
    lines += ["", f"{text['per_category']}:"]
    for category in taxonomy.categories.values():
        if not category.attributes:
            lines.append(f"- {category.value.label(language)}: {text['none']}")
            continue
        lines.append(f"- {category.value.label(language)}:")
        lines += [f"  - {_attribute_line(attribute, language)}" for attribute in category.attributes]
    if summary_chars:
        lines += ["", text["summary"].format(max_chars=summary_chars)]
    return "\n".join(lines)


def _attribute_line(attribute: Attribute, language: Language) -> str:
    return f"{attribute.name} ({attribute.label(language)}): {_values(attribute, language)}"


def build_prompt(taxonomy: Taxonomy, language: Language, summary_max_tokens: int) -> PromptText:
    text = _TEXT[language]
    summary_chars = taxonomy.summary_max_chars if summary_max_tokens > 0 else None
    prefix = (
        f"{IM_START}system\n{text['system']}{IM_END}\n"
        f"{IM_START}user\n{instructions(taxonomy, language, summary_chars)}\n"
    )
    after_image = f"{text['question']}{IM_END}\n{IM_START}assistant\n" + '{"' + CATEGORY + '": "'
    version_source = "\n".join(
        [TEMPLATE_REVISION, language, taxonomy.version, str(summary_max_tokens), prefix, after_image]
    )
    version = "pv-" + hashlib.sha256(version_source.encode()).hexdigest()[:16]
    return PromptText(prefix=prefix, after_image=after_image, language=language, version=version)


def image_placeholder(image_tokens: int) -> str:
    return VISION_START + IMAGE_PAD * image_tokens + VISION_END


def key_opening(name: str) -> str:
    """What follows a finished value: the next key and the opening quote of its value."""
    return f'", "{name}": "'


CLOSING = '"}'


def corpus_texts(taxonomy: Taxonomy) -> list[str]:
    """Text for training the tiny model's tokenizer: every prompt and every possible answer piece."""
    texts = []
    for language in ("en", "zh"):
        prompt = build_prompt(taxonomy, language, 40)
        texts += [prompt.prefix, prompt.after_image]
        for attribute in (taxonomy.category_attribute, *taxonomy.attributes.values()):
            texts += [value.label(language) + key_opening(attribute.name) for value in attribute.values]
    texts.append('{"category": "dress", "summary": "a red floral dress"}')
    texts.append(f'"{SUMMARY}": "女士碎花连衣裙，方领短袖设计，腰部有松紧收褶，整体呈现法式田园风格。"' + "}")
    return texts
