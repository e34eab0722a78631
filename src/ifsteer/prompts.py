"""Base queries (our own text) and the with/without-instruction pairs built from them.

A steering vector is the mean activation difference between the same query with and without an
instruction, so the two prompts of a pair must differ by exactly the appended instruction text,
and the queries themselves must carry no instruction of their own.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ifsteer.errors import IfsteerError
from ifsteer.instructions import Instruction

BASE_QUERIES: tuple[str, ...] = (
    # Explanations
    "Explain why the sky looks blue during the day and red at sunset.",
    "Explain how vaccines train the immune system to recognize a virus.",
    "Why do cats purr, and what does it tell us about how they feel?",
    "Explain the difference between weather and climate to a curious teenager.",
    "How does a refrigerator keep food cold without freezing the whole kitchen?",
    "What causes the tides in the ocean?",
    "Explain how compound interest works, using a savings account as an example.",
    "Why do onions make people cry when they are chopped?",
    "How do bees tell the rest of the hive where to find flowers?",
    "Explain what a black hole is to someone who has never studied physics.",
    "What makes sourdough bread rise without store-bought yeast?",
    "How does a bicycle stay upright while it is moving?",
    "Explain how noise-cancelling headphones block out sound.",
    "Why do leaves change color in autumn?",
    "Explain how a bill becomes a law in a parliamentary democracy.",
    "What is inflation, and why do prices tend to rise over time?",
    "How do solar panels turn sunlight into electricity?",
    "Why do we dream, and what do scientists currently think dreams are for?",
    "What is the greenhouse effect, and how does it influence the planet's temperature?",
    "How does GPS figure out where my phone is?",
    "Explain how a search engine decides which pages to show first.",
    "Why does ice float on water when most solids sink in their own liquid?",
    "What is photosynthesis, and why does it matter for life on Earth?",
    "Explain how credit scores are calculated and why they matter.",
    "How do airplanes generate enough lift to fly?",
    "Explain why the Roman Empire eventually fell.",
    "How do earthquakes happen, and why are some regions hit more often than others?",
    "What does a central bank do, and why does it change interest rates?",
    # Stories
    "Write a story about a lighthouse keeper who finds a message in a bottle.",
    "Tell a story about a robot that learns to paint.",
    "Write a bedtime story about a shy dragon who is afraid of the dark.",
    "Write a story set on a night train crossing the mountains.",
    "Tell a tale about two rival bakers who must work together for a village festival.",
    "Write a story about a girl who discovers her grandmother's old map.",
    "Write a mystery story about a missing violin at a music school.",
    "Tell a story from the point of view of a houseplant watching its family.",
    "Write a fable about a fox, a crow, and a borrowed umbrella.",
    "Write a science fiction story about the first colony on a distant moon.",
    "Tell a story about a retired astronaut who opens a bakery.",
    "Write a story about a dog who waits at the station every evening.",
    "Write a fairy tale about a kingdom where it never stops snowing.",
    "Tell a ghost story suitable for a campfire with young children.",
    "Write a story about a librarian who finds a book that writes itself.",
    "Write a story about a fisherman who befriends a seal.",
    # Emails
    "Write an email to my landlord asking for the broken heater to be repaired.",
    "Write an email to a colleague thanking them for covering my shift last week.",
    "Draft an email inviting my team to a farewell lunch for a retiring manager.",
    "Write an email to a professor asking for an extension on an assignment.",
    "Write an email to a hotel asking whether they can arrange an airport pickup.",
    "Draft an email to a client apologizing for a delayed delivery.",
    "Write an email to my neighbors proposing a shared community garden.",
    "Write an email asking a former manager to be a reference for a new job.",
    "Compose an email to customer support about being charged twice for one order.",
    "Write an email welcoming a new volunteer to our animal shelter.",
    "Write an email to a band I love asking whether they will tour near my town.",
    # Advice
    "What advice would you give someone starting their first job?",
    "How can I become more confident when speaking in public?",
    "I keep procrastinating on my studies. What can I do about it?",
    "How should I prepare for a job interview at a software company?",
    "What can I do to sleep better at night?",
    "My friend and I had an argument. How can I repair the friendship?",
    "How do I start running if I have never exercised before?",
    "What should I consider before adopting a dog?",
    "How can I save money on groceries without eating poorly?",
    "I am moving to a new city alone. How can I make friends there?",
    "How can a small business attract its first customers?",
    "What should I keep in mind when buying a used car?",
    "How can I help my child enjoy reading?",
    "What are good ways to manage stress during exam season?",
    "How do I negotiate a higher salary politely?",
    "How can I stay focused when working from a noisy shared apartment?",
    # Comparisons
    "Compare renting and buying a home for a young couple.",
    "What are the differences between cats and dogs as pets?",
    "Compare electric cars with petrol cars in terms of cost and environmental impact.",
    "How does studying at a university differ from learning a trade as an apprentice?",
    "Compare tea and coffee as morning drinks.",
    "What are the pros and cons of working from home versus working in an office?",
    "Compare reading printed books with reading on an e-reader.",
    "How do trains and planes compare for travel between nearby cities?",
    "Compare keeping savings in a bank account with investing them in index funds.",
    "What distinguishes a crocodile from an alligator?",
    "Compare living in a big city with living in the countryside.",
    "How is a violin different from a viola?",
    "Compare cooking with gas and cooking on an induction hob.",
    # How-tos
    "How do I repot a houseplant without damaging its roots?",
    "How do I make a simple tomato sauce from scratch?",
    "How can I change a flat tire on a car?",
    "How do I brew a good cup of pour-over coffee?",
    "How can I set up a budget for my monthly expenses?",
    "How do I teach a puppy to sit?",
    "How do I start a vegetable garden on a balcony?",
    "How can I remove a red wine stain from a carpet?",
    "How do I prepare for a day hike in the mountains?",
    "How can I back up the photos on my phone?",
    "How do I bake chocolate chip cookies that stay soft?",
    "How can I improve my handwriting as an adult?",
    "How do I write a good cover letter?",
    "How can I learn to juggle three balls?",
    "How do I clean a cast iron pan properly?",
    "How do I fix a squeaky door hinge?",
    # Descriptions
    "Describe a busy market on a Saturday morning.",
    "Describe the view from the top of a mountain at sunrise.",
    "Describe what it feels like to swim in the sea in winter.",
    "Describe an old bookshop that has been open for a hundred years.",
    "Describe a thunderstorm rolling over a wheat field.",
    "Describe the perfect reading nook.",
    "Describe a city street after the rain at night.",
    "Describe the atmosphere in a stadium just before a final match.",
    "Describe a coral reef to someone who has never seen the ocean.",
    "Describe the smells and sounds of a bakery early in the morning.",
    "Describe a day in the life of a zookeeper.",
    "Describe the life cycle of a frog.",
    # Topic overviews
    "Give an overview of the history of the printing press.",
    "Tell me about the life of Marie Curie.",
    "What were the main causes of the First World War?",
    "Give an overview of how the internet developed.",
    "Tell me about the ancient city of Petra.",
    "What is the story behind the construction of the Panama Canal?",
    "Give an overview of the water cycle.",
    "Tell me about the history of the Olympic Games.",
    "What do we know about the Maya civilization?",
    "Give an overview of how jazz music developed.",
    "Tell me about the migration of monarch butterflies.",
    "What happened during the Apollo 11 mission?",
    # Poems
    "Write a poem about the first snowfall of the year.",
    "Write a poem about an old oak tree.",
    "Write a poem celebrating a grandmother's kitchen.",
    "Write a poem about a city waking up.",
    "Write a poem about the sea at night.",
    "Write a poem about a friendship that survives distance.",
    "Write a poem about a cup of tea on a rainy afternoon.",
    "Write a limerick about a forgetful wizard.",
    "Write a poem about the sound of rain on a tin roof.",
    "Write a poem from the perspective of the moon.",
    # Product descriptions and adverts
    "Write a product description for a reusable water bottle that keeps drinks cold all day.",
    "Write a product description for a handmade wool scarf.",
    "Describe a new smartwatch designed for hikers to potential buyers.",
    "Write a product description for a silent desk fan.",
    "Write an advertisement for a neighborhood bicycle repair shop.",
    "Write a product description for an ergonomic office chair.",
    "Write a product description for a board game about building cities.",
    "Write a description of a cozy cabin for a holiday rental website.",
    "Write a pitch for a mobile app that helps people swap books.",
    "Write a job advertisement for a part-time gardener.",
    # Letters and speeches
    "Write a letter to my future self to open in ten years.",
    "Write a thank-you letter to a teacher who changed my life.",
    "Write a letter to the city council asking for more bike lanes.",
    "Write a letter of recommendation for a hardworking student.",
    "Write a letter to a pen pal describing my hometown.",
    "Write a letter of complaint to an airline about lost luggage.",
    "Write a letter congratulating a friend on their new baby.",
    "Write a letter from a sailor to his family while he is at sea.",
    "Write a speech for my best friend's wedding.",
    "Write a toast for my parents' anniversary dinner.",
    "Write a eulogy for a beloved family cat.",
    "Write a motivational message for a team that just lost a big game.",
    # Plans
    "Make a plan for a weekend trip to the seaside on a tight budget.",
    "Plan a birthday party for a seven-year-old who loves dinosaurs.",
    "Create a weekly meal plan for a vegetarian student.",
    "Plan a study schedule for someone preparing for a final exam in a month.",
    "Make a training plan for a beginner preparing for a 5K run.",
    "Plan a three-day visit to Rome for a first-time traveler.",
    "Create a plan for decluttering a small apartment.",
    "Plan a team-building day for a group of twenty coworkers.",
    "Draft a plan for launching a small online bakery.",
    "Make a plan for learning to play the guitar in six months.",
    # Open questions and creative tasks
    "What are some fun activities for a rainy afternoon with kids?",
    "Suggest some names for a new coffee shop near a university.",
    "What makes a good leader?",
    "Why is biodiversity important for ecosystems?",
    "What are the benefits of learning to cook?",
    "What would happen if humans could photosynthesize?",
    "Imagine a world without electricity. How would daily life change?",
    "Write a review of an imaginary restaurant that serves only soup.",
    "What ethical questions do self-driving cars raise?",
    "Write a dialogue between a detective and a nervous witness.",
    "What should a tourist know before visiting Iceland?",
    "Why do people enjoy horror movies?",
    "How can I take better photos with my phone?",
    "Explain the rules of chess to a complete beginner.",
    "Suggest ways a school could reduce its food waste.",
    "What is the role of a referee in a football match?",
)


@dataclass(frozen=True)
class PromptPair:
    """One query with the instruction appended, and the same query without it."""

    with_instruction: str
    without_instruction: str


def _draw_queries(queries: list[str], n_pairs: int, rng: random.Random) -> list[str]:
    """Walk fresh shuffles of the queries, so none repeats before every one has been used."""
    drawn: list[str] = []
    while len(drawn) < n_pairs:
        order = list(queries)
        rng.shuffle(order)
        drawn.extend(order)
    return drawn[:n_pairs]


def build_pairs(
    instruction: Instruction,
    n_pairs: int,
    queries: Sequence[str] = BASE_QUERIES,
    seed: int = 0,
) -> list[PromptPair]:
    """Pairs for one instruction: distinct queries where possible, phrasings used in turn.

    Rotating the phrasings keeps each one's share equal (counts differ by at most one), so the
    mean difference reflects the instruction rather than a favourite wording. Same seed, same pairs.
    """
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be at least 1, got {n_pairs}")
    cleaned = [query.strip() for query in queries if query.strip()]
    if not cleaned:
        raise ValueError("no base queries to build pairs from")
    rng = random.Random(seed)
    phrasings = list(instruction.phrasings)
    rng.shuffle(phrasings)
    chosen = _draw_queries(cleaned, n_pairs, rng)
    return [
        PromptPair(f"{query} {phrasings[i % len(phrasings)]}", query)
        for i, query in enumerate(chosen)
    ]


def _query_from_record(record: object, path: Path, line_number: int) -> str:
    if isinstance(record, dict):
        for field in ("prompt_without_instruction", "prompt"):
            value = record.get(field)
            if isinstance(value, str) and value.strip():
                return value.strip()
    raise IfsteerError(
        f"{path}, line {line_number}: expected a JSON object with a non-empty "
        "'prompt_without_instruction' or 'prompt' string"
    )


def _queries_from_jsonl(path: Path, lines: list[str]) -> list[str]:
    queries = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise IfsteerError(f"{path}, line {line_number}: not valid JSON ({err.msg})") from err
        queries.append(_query_from_record(record, path, line_number))
    return queries


def load_queries(path: Path) -> list[str]:
    """Read base queries a user supplies: `.jsonl` rows (IFEval style) or plain text, one a line.

    In a jsonl row `prompt_without_instruction` wins over `prompt`, so an IFEval-format file with
    instructions stripped gives clean base queries.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise IfsteerError(f"cannot read query file {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise IfsteerError(f"query file {path} is not UTF-8 text") from err
    lines = text.splitlines()
    if path.suffix == ".jsonl":
        queries = _queries_from_jsonl(path, lines)
    else:
        queries = [line.strip() for line in lines if line.strip()]
    if not queries:
        raise IfsteerError(f"query file {path} holds no queries")
    return queries
