"""ReMixer prompts and per-domain profiles (the ReasonEmbed paper). The wording is ours; the fields and rules are the
paper's: a per-domain task instruction, the document between content markers, output-only / self-contained rules,
a sampled target length and education level (stage 1); a per-domain relevance definition with query and document
types, three reasoning steps and a 1-5 score inside ``<score>`` tags (stage 3).

The reasoning-query prompt (q') is not published by the paper; :data:`REASONING_PROMPT` is our own design: it asks
the generator to restate the need, reason about which knowledge would answer it, and list the key terms a helpful
document would contain, without answering.

Templates are filled with ``str.format`` on the template only, so braces inside documents or queries are safe.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from reasonembed.config.synthesize import DomainProfileConfig, SynthesizeJobConfig
from reasonembed.data.bright import BRIGHT_INSTRUCTIONS


@dataclass(frozen=True)
class DomainProfile:
    """Everything domain-specific that a prompt or a training sample needs."""

    domain: str
    label: str
    generation_instruction: str
    output_name: str
    query_type: str
    doc_type: str
    relevance_definition: str
    retrieval_instruction: str
    train_group_size: int = 16
    batch_size: int = 8


def _se_profile(domain: str, label: str, topic: str | None = None) -> DomainProfile:
    topic = topic or label
    query_type = f"{label} post"
    return DomainProfile(
        domain=domain,
        label=topic,
        generation_instruction=(
            f"You are given a passage related to {topic}, written in {{language}}. Write a StackExchange post in "
            "{language} asking something that a domain expert could answer by drawing on the key concepts or "
            "theories the passage discusses."
        ),
        output_name="StackExchange post",
        query_type=query_type,
        doc_type="passage",
        relevance_definition=(
            f"a document is relevant to a query ({query_type}) when the key concepts or theories it discusses "
            "would give a domain expert useful references for writing an answer to the query."
        ),
        retrieval_instruction=BRIGHT_INSTRUCTIONS.get(domain, f"Given a {label} post, retrieve relevant passages "
                                                      "that help answer the post."),
    )


_MATH_REL = ("a document is relevant to a query ({q}) when the {what} used in the document give useful insight "
             "for solving the problem in the query.")

BUILTIN_PROFILES: dict[str, DomainProfile] = {
    "biology": _se_profile("biology", "Biology"),
    "earth_science": _se_profile("earth_science", "Earth Science"),
    "economics": _se_profile("economics", "Economics"),
    "psychology": _se_profile("psychology", "Psychology"),
    "robotics": _se_profile("robotics", "Robotics"),
    "stackoverflow": _se_profile("stackoverflow", "Stack Overflow", topic="Coding"),
    "sustainable_living": _se_profile("sustainable_living", "Sustainable Living"),
    "leetcode": DomainProfile(
        domain="leetcode",
        label="Coding",
        generation_instruction=(
            "You are given a solved programming problem with its solution, written in {language}. Write a new, "
            "different LeetCode-style problem in {language} that the same algorithm or data structure helps solve."
        ),
        output_name="LeetCode problem",
        query_type="LeetCode problem",
        doc_type="solved coding problem",
        relevance_definition=(
            "a document is relevant to a query (LeetCode problem) when the algorithms or data structures used in "
            "the document give useful insight for solving the problem in the query."
        ),
        retrieval_instruction=BRIGHT_INSTRUCTIONS["leetcode"],
        train_group_size=2,
        batch_size=64,
    ),
    "pony": DomainProfile(
        domain="pony",
        label="Pony programming",
        generation_instruction=(
            "You are given a passage from the documentation of the Pony programming language, written in "
            "{language}. Write a Pony coding instruction in {language} whose implementation needs the syntax the "
            "passage describes."
        ),
        output_name="Pony coding instruction",
        query_type="Pony coding instruction",
        doc_type="Pony documentation passage",
        relevance_definition=(
            "a document is relevant to a query (Pony coding instruction) when a beginner with no prior knowledge "
            "of Pony would need the syntax the document describes to complete the instruction."
        ),
        retrieval_instruction=BRIGHT_INSTRUCTIONS["pony"],
        train_group_size=64,
        batch_size=2,
    ),
    "aops": DomainProfile(
        domain="aops",
        label="Math",
        generation_instruction=(
            "You are given the solution of a math problem, written in {language}. Write a new math problem in "
            "{language} that the same problem-solving skills help solve."
        ),
        output_name="math problem",
        query_type="math problem",
        doc_type="math problem solution",
        relevance_definition=_MATH_REL.format(q="math problem", what="techniques and theorems"),
        retrieval_instruction=BRIGHT_INSTRUCTIONS["aops"],
    ),
    "theoremqa_questions": DomainProfile(
        domain="theoremqa_questions",
        label="Math",
        generation_instruction=(
            "You are given the solution of a math problem, written in {language}. Write a new math problem in "
            "{language} that the same theorems help solve."
        ),
        output_name="math problem",
        query_type="math problem",
        doc_type="math problem solution",
        relevance_definition=_MATH_REL.format(q="math problem", what="theorems"),
        retrieval_instruction=BRIGHT_INSTRUCTIONS["theoremqa_questions"],
    ),
    "theoremqa_theorems": DomainProfile(
        domain="theoremqa_theorems",
        label="Math",
        generation_instruction=(
            "You are given a math theorem, written in {language}. Write a math problem in {language} that this "
            "theorem helps solve."
        ),
        output_name="math problem",
        query_type="math problem",
        doc_type="theorem statement",
        relevance_definition=(
            "a document is relevant to a query (math problem) when the theorem the document describes helps solve "
            "the problem in the query."
        ),
        retrieval_instruction=BRIGHT_INSTRUCTIONS["theoremqa_theorems"],
    ),
}


def generic_profile(domain: str) -> DomainProfile:
    """Profile of a domain without a built-in one: a StackExchange-style question about the domain's topic."""
    label = domain.replace("_", " ").replace("-", " ").strip().title() or domain
    return _se_profile(domain, label)


def profile_for(domain: str, override: DomainProfileConfig | None = None) -> DomainProfile:
    """The built-in (or generic) profile of ``domain`` with the config's overrides applied."""
    base = BUILTIN_PROFILES.get(domain) or generic_profile(domain)
    if override is None:
        return base
    return replace(base, **{k: v for k, v in override.model_dump().items() if v is not None})


def profiles(cfg: SynthesizeJobConfig) -> dict[str, DomainProfile]:
    """Profiles of every configured domain."""
    return {d: profile_for(d, cfg.domain_profiles.get(d)) for d in cfg.data.domains}


GENERATION_PROMPT = """\
{instruction}

The content:
<<<BEGIN CONTENT>>>
{text}
<<<END CONTENT>>>

Rules:
- Output only the {output_name}: no preface, no explanation, no heading such as "Post:".
- Make it self-contained. A reader who has never seen the content must understand it, so never point back at the \
content with words such as "it", "this", "that", "the passage", "the given text" or "the provided content".
- Length: about {length}.
- Difficulty: understanding it should take {education} level education.

Your {output_name}:"""

REASONING_PROMPT = """\
Below is a {query_type} about {label}. Rewrite it as a search query that makes the reasoning explicit:
1. restate in one sentence what is really being asked;
2. reason step by step about which concepts, theorems, algorithms or facts would be needed to answer it;
3. end with a short list of the key terms that a helpful document would contain.
Do not answer the {query_type} itself, and output only the rewritten query.

{query_type}:
<<<BEGIN QUERY>>>
{query}
<<<END QUERY>>>

Rewritten query:"""

ANNOTATION_PROMPT = """\
Relevance definition for this retrieval task: {relevance_definition}

Judge how relevant a document ({doc_type}) is to a query ({query_type}) in three steps:
1. Query analysis: reason about which information would help most to answer the query.
2. Document analysis: explain whether, and how far, the document supplies that information.
3. Relevance judgement: using the definition and steps 1 and 2, justify your verdict, then give an integer score \
from 1 to 5:
   - 5 (highly relevant): answers the query directly and completely, with accurate and specific information.
   - 4 (relevant): gives most of what is needed, with small gaps or a slight misalignment.
   - 3 (moderately relevant): gives partial information; incomplete or imprecise, but a real connection.
   - 2 (slightly relevant): only a small part is tangentially related; mostly of little use.
   - 1 (irrelevant): unrelated; nothing useful for the query.

Finish your response with the score alone between score tags, e.g. <score>3</score>, with nothing else inside the \
tags. Keep the whole response under 512 words.

Query ({query_type}):
<<<BEGIN QUERY>>>
{query}
<<<END QUERY>>>

Document ({doc_type}):
<<<BEGIN DOCUMENT>>>
{doc}
<<<END DOCUMENT>>>"""

DOMAIN_FILTER_PROMPT = """\
Does the passage below belong to the domain "{label}"? Answer with exactly one word: Yes or No.

<<<BEGIN PASSAGE>>>
{text}
<<<END PASSAGE>>>

Answer:"""


def generation_prompt(p: DomainProfile, text: str, length: str, education: str, language: str,
                      template: str | None = None) -> str:
    """Stage 1 prompt for one source document (``template`` overrides :data:`GENERATION_PROMPT`, same fields)."""
    return (template or GENERATION_PROMPT).format(
        instruction=p.generation_instruction.format(language=language), text=text, output_name=p.output_name,
        length=length, education=education,
    )


def reasoning_prompt(p: DomainProfile, query: str, template: str | None = None) -> str:
    """q' prompt for one query (``template`` overrides :data:`REASONING_PROMPT`)."""
    return (template or REASONING_PROMPT).format(query=query, query_type=p.query_type, label=p.label)


def annotation_prompt(p: DomainProfile, query: str, doc: str, template: str | None = None) -> str:
    """Stage 3 prompt for one (query, candidate) pair (``template`` overrides :data:`ANNOTATION_PROMPT`)."""
    return (template or ANNOTATION_PROMPT).format(
        relevance_definition=p.relevance_definition, doc_type=p.doc_type, query_type=p.query_type, query=query,
        doc=doc,
    )


def domain_filter_prompt(p: DomainProfile, text: str) -> str:
    """Stage 0 yes/no prompt for one document."""
    return DOMAIN_FILTER_PROMPT.format(label=p.label, text=text)
