"""How each instruction of the catalogue is asked for in words: the phrasing tables.

Data only, kept apart from `instructions` (the catalogue's logic) so each reads on its own.
Every instruction carries several phrasings because a vector averaged over varied wordings
points at the instruction itself rather than at one sentence. All phrasings are our own text.
"""

from __future__ import annotations

__all__ = ["FORMAT", "KEYWORD_TEMPLATES", "LANGUAGES", "LANGUAGE_TEMPLATES", "LENGTH"]

# id -> (description, phrasings)
FORMAT: dict[str, tuple[str, tuple[str, ...]]] = {
    "change_case:capital_word_frequency": (
        "A few whole words in capitals for emphasis.",
        (
            "Emphasize key terms by writing at least 3 whole words in ALL CAPS.",
            "Stress the important ideas by typing several words entirely in capital letters, "
            "at least 4 of them.",
            "Include at least 2 words spelled completely in uppercase to make them stand out.",
            "Make your main points pop by writing at least 5 words in full capitals.",
            "Somewhere in the reply, put at least 3 crucial words in all capital letters.",
            "Use uppercase-only words for emphasis, at least twice in your answer.",
        ),
    ),
    "change_case:english_capital": (
        "Whole reply in English, all capital letters.",
        (
            "Write your whole reply in English using only capital letters.",
            "Every letter of your answer must be uppercase, and the answer must be in English.",
            "Respond in English, typing everything in ALL CAPS.",
            "Use uppercase letters exclusively for the entire response, written in English.",
            "Do not use a single lowercase letter anywhere in your English reply.",
            "Answer in English as if caps lock were on from the first word to the last.",
        ),
    ),
    "change_case:english_lowercase": (
        "Whole reply in English, all lowercase letters.",
        (
            "Write your whole reply in English using only lowercase letters.",
            "Do not use any capital letters anywhere in your English response.",
            "Respond in English, keeping every letter lowercase, even at the start of a sentence.",
            "Your entire answer should be in English and contain no uppercase characters at all.",
            "Type everything in lower case, in English, with no capitalization whatsoever.",
            "Keep the full response in English and entirely in small letters, names included.",
        ),
    ),
    "detectable_format:constrained_response": (
        "Answer with one of three fixed yes/no/maybe phrases.",
        (
            'Reply with exactly one of these options: "My answer is yes.", "My answer is no.", '
            'or "My answer is maybe."',
            "Your response must contain one of the following phrases word for word: "
            "My answer is yes. / My answer is no. / My answer is maybe.",
            "Settle the question by picking one phrase from this set and writing it exactly: "
            '"My answer is yes.", "My answer is no.", "My answer is maybe."',
            'Choose a single verdict among "My answer is yes.", "My answer is no." and '
            '"My answer is maybe." and state it verbatim.',
            "Conclude with precisely one of the three fixed answers: "
            '"My answer is yes.", "My answer is no.", "My answer is maybe."',
        ),
    ),
    "detectable_format:json_format": (
        "Whole reply as JSON.",
        (
            "Format your entire output as valid JSON.",
            "Return the whole answer as a JSON object and nothing outside it.",
            "Wrap everything you write in JSON; markdown code fences around it are fine.",
            "Structure the complete reply as JSON data with meaningful keys.",
            "Produce only JSON in your response, with no prose before or after it.",
            "Encode your answer as a single well-formed JSON document.",
        ),
    ),
    "detectable_format:multiple_sections": (
        "Reply split into numbered sections (SECTION 1, SECTION 2, ...).",
        (
            "Divide your answer into 3 parts and start each one with SECTION X, "
            "where X is its number.",
            "Organize the response into 4 sections, labelling the start of each as Section 1, "
            "Section 2, and so on.",
            "Split what you write into 2 sections, each opening with the marker SECTION "
            "followed by its number.",
            "Break the reply into 5 numbered sections, beginning every section with 'Section N'.",
            "Your response needs exactly 3 sections; mark where each begins with SECTION 1, "
            "SECTION 2 and SECTION 3.",
        ),
    ),
    "detectable_format:number_bullet_lists": (
        "An exact number of markdown bullet points.",
        (
            "Give your answer as exactly 3 markdown bullet points, each starting with '* '.",
            "Use precisely 4 bullet points in markdown format, each line beginning with '* '.",
            "Present the response as a markdown list of exactly 5 bullets, marked with asterisks.",
            "Your reply must contain exactly 2 bullet points written with the markdown '* ' "
            "prefix, and no other bullets.",
            "Lay out your answer in exactly 3 markdown bullets, putting * at the start of each.",
            "Answer using no more and no fewer than 4 asterisk bullet points in markdown.",
        ),
    ),
    "detectable_format:number_highlighted_sections": (
        "Several passages highlighted with *asterisks*.",
        (
            "Highlight at least 2 parts of your answer with markdown, like *this highlighted "
            "part*.",
            "Mark at least 3 key passages by surrounding them with single asterisks, "
            "e.g. *key idea*.",
            "Use markdown emphasis (*like this*) to highlight at least 4 parts of the response.",
            "Make sure at least 2 phrases are highlighted by wrapping them in asterisks, as in "
            "*important phrase*.",
            "Draw attention to at least 3 segments of your reply by enclosing each in single "
            "asterisks.",
        ),
    ),
    "detectable_format:title": (
        "A title in double angular brackets, <<like this>>.",
        (
            "Give your response a title wrapped in double angular brackets, such as <<my title>>.",
            "Start with a title enclosed in double angle brackets, for example <<A Fitting "
            "Title>>.",
            "Include a heading placed inside << and >>, like <<heading here>>.",
            "Your answer must carry a title written between double angular brackets, "
            "e.g. <<Title>>.",
            "Put a title at the top of the reply, surrounded by double chevrons: <<like this>>.",
        ),
    ),
    "punctuation:no_comma": (
        "No commas anywhere.",
        (
            "Do not use any commas in your response.",
            "Write the whole answer without a single comma.",
            "Avoid commas entirely; use other punctuation instead.",
            "Your reply must contain zero commas.",
            "Leave out every comma from your response, rephrasing where needed.",
            "Refrain from using the comma character anywhere in what you write.",
        ),
    ),
    "startend:end_checker": (
        "End with an exact closing phrase.",
        (
            'Finish your response with the exact phrase "Is there anything else I can help '
            'with?" and add nothing after it.',
            'End your reply with the sentence "Let me know if you have more questions." '
            "with no words following it.",
            'The very last words of your answer must be "Hope this helps!" and nothing may come '
            "after them.",
            'Close your response with exactly this line: "Is there anything else I can help with?"',
            'Make "That is all for now." the final sentence of your reply, with nothing after it.',
        ),
    ),
    "startend:quotation": (
        "Whole reply wrapped in double quotation marks.",
        (
            "Wrap your entire response in double quotation marks.",
            "Put the whole answer inside a pair of double quotes.",
            "Begin and end your reply with a double quotation mark so that everything is quoted.",
            "Enclose everything you write between double quote characters.",
            "Surround your full response with double quotes, from the first character to the last.",
        ),
    ),
}

# IFEval's 31 response-language rows use 22 codes; these 19 include all 14 of its
# single-instruction evaluation prompts. IFEval's langdetect checker supports every one of them.
LANGUAGES: dict[str, str] = {
    "ar": "Arabic",
    "bn": "Bengali",
    "de": "German",
    "fa": "Persian",
    "gu": "Gujarati",
    "hi": "Hindi",
    "it": "Italian",
    "kn": "Kannada",
    "ko": "Korean",
    "mr": "Marathi",
    "ne": "Nepali",
    "pa": "Punjabi",
    "pt": "Portuguese",
    "ru": "Russian",
    "sw": "Swahili",
    "te": "Telugu",
    "th": "Thai",
    "ur": "Urdu",
    "vi": "Vietnamese",
}

LANGUAGE_TEMPLATES: tuple[str, ...] = (
    "Write your entire response in {name}; no other language is allowed.",
    "Reply only in {name}, without using any other language.",
    "Your whole answer must be written in the {name} language.",
    "Respond exclusively in {name}.",
    "Use {name} and nothing else for the complete reply.",
)

LENGTH: dict[str, tuple[str, tuple[str, ...]]] = {
    "extremely_concise": (
        "As short as possible: a sentence at most.",
        (
            "Answer in as few words as possible.",
            "Keep your reply extremely short: a single sentence at most.",
            "Be as brief as you possibly can.",
            "Respond with the bare minimum, one short sentence.",
            "Give an ultra-short answer with no elaboration at all.",
        ),
    ),
    "concise": (
        "Short and to the point.",
        (
            "Keep your answer short and to the point.",
            "Be concise.",
            "Respond briefly, in just a few sentences.",
            "Give a compact answer without unnecessary detail.",
            "Please keep it brief.",
        ),
    ),
    "moderate": (
        "Medium length, neither terse nor lengthy.",
        (
            "Give an answer of moderate length.",
            "Respond with a medium-length answer, neither terse nor lengthy.",
            "Aim for a balanced amount of detail in your reply.",
            "Write a reply of typical length, a couple of paragraphs at most.",
            "Provide a reasonably sized answer, not too short and not too long.",
        ),
    ),
    "verbose": (
        "Long and thorough.",
        (
            "Give a detailed and thorough answer.",
            "Respond at length, covering the topic in depth.",
            "Be generous with detail and explanation in your reply.",
            "Write a long, comprehensive response.",
            "Elaborate fully, with examples and explanations.",
        ),
    ),
    "extremely_verbose": (
        "As long and exhaustive as possible.",
        (
            "Write an extremely long and exhaustive answer, covering every aspect you can "
            "think of.",
            "Be as verbose as possible and go into exhaustive detail.",
            "Give the longest, most elaborate response you can, leaving nothing out.",
            "Respond with an extensive essay that explores every angle in depth.",
            "Make your answer exceptionally lengthy and thorough, with many examples and "
            "digressions.",
        ),
    ),
}

KEYWORD_TEMPLATES: tuple[str, ...] = (
    'Be sure the word "{word}" appears in your answer.',
    'Use the word "{word}" somewhere in your response.',
    'Your reply must include the word "{word}".',
    'Work the word "{word}" into what you write.',
    'Include the keyword "{word}" at least once.',
)
