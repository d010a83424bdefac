"""``hippo pipeline``: run a recipe's enabled stages in order.

Until the stage issues land this is a preview: it validates the recipe, loads the base
model, answers one medical question with it, and lists the stages that will run.
"""

from __future__ import annotations

import argparse

from hippocrates.config import load_recipe
from hippocrates.progress import status

PREVIEW_QUESTION = "What are the warning signs of a stroke, and what should someone do if they notice them?"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="length of the preview answer")


def generate_answer(model, tokenizer, question: str, max_new_tokens: int) -> str:
    """Greedy answer to one question, through the chat template when the tokenizer has one."""
    import torch

    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    else:
        text = f"Question: {question}\nAnswer:"
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run(args: argparse.Namespace) -> int:
    from hippocrates.models import load_model, load_tokenizer, resolve_model

    recipe = load_recipe(args.recipe)
    status(f"recipe {args.recipe} is valid: {recipe.name}, base model {recipe.base_model}")
    resolved = resolve_model(recipe.base_model)
    tokenizer = load_tokenizer(resolved, trust_remote_code=recipe.trust_remote_code)
    model = load_model(resolved, precision="fp32", trust_remote_code=recipe.trust_remote_code)
    answer = generate_answer(model, tokenizer, PREVIEW_QUESTION, args.max_new_tokens)
    print(f"model: {resolved.spec} -> {resolved.path}")
    print(f"Q: {PREVIEW_QUESTION}\nA: {answer}\n")
    print("stages that will run, in order:")
    for i, stage in enumerate(recipe.enabled_stages(), 1):
        print(f"  {i}. {stage}")
    print(f"outputs: {recipe.output_dir}/<stage>/ (training stages are not available yet: issue #3)")
    return 0
