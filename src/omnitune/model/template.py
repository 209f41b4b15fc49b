"""Qwen3-Omni chat templates (Jinja), one per variant, following the released template's rules.

Rules (../shared/QWEN3_OMNI_NOTES.md, "Chat template and labels"): ChatML, no default system prompt, content
items rendered in order with no separators. Instruct and Captioner never render a think block. Thinking renders
`<think>\\n{reasoning}\\n</think>\\n\\n{answer}` on the assistant turns after the last user turn and strips
reasoning from earlier ones; unlike the released template, "last user turn" counts turns with media too.
The processor expands each single pad token into the right number of audio/image/video tokens.
"""

_MEDIA = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for c in content -%}"
    "{%- if c['type'] == 'audio' -%}{{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}"
    "{%- elif c['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif c['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif c['type'] == 'text' -%}{{- c['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

INSTRUCT = _MEDIA + (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}{{- render(m['content']) -}}{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

THINKING = _MEDIA + (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- set text = render(m['content']) -%}"
    "{%- set reasoning = m.get('reasoning_content') or '' -%}"
    "{%- if '</think>' in text -%}"
    "{%- set reasoning = text.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
    "{%- set text = text.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + text.lstrip('\\n') -}}"
    "{%- else -%}{{- text -}}{%- endif -%}"
    "{%- else -%}{{- render(m['content']) -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

TEMPLATES = {"instruct": INSTRUCT, "captioner": INSTRUCT, "thinking": THINKING}


def chat_template(variant: str) -> str:
    """The Jinja chat template our renderer and exported checkpoints use for `variant`."""
    return TEMPLATES[variant]
