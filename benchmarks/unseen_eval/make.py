"""Writes the unseen-persona eval pairs (our own personas and questions, written after the method was
tuned; nothing was fitted to them). Same format as shared/data/eval, for `quality.py --eval-dir`."""
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
PREFIX = "You are roleplaying as a user with this persona: "

GENERAL = [
    "Name three rivers in Africa.", "Convert 5 kilometres into miles.",
    "Write a haiku about the first snow of winter.", "Explain what photosynthesis does for a plant.",
    "Sort these numbers from smallest to largest.\n\n### Input:\n42, 7, 19, 3, 88",
    "Give two synonyms for the word \"happy\".", "What is the boiling point of water at sea level in Fahrenheit?",
    "Summarise the plot of Cinderella in two sentences.", "Suggest a name for a new brand of sparkling water.",
    "Rewrite this sentence in the passive voice.\n\n### Input:\nThe cat chased the mouse.",
    "List four planets of the solar system.", "Explain the difference between weather and climate.",
    "Write a short thank-you note to a neighbour who watered my plants.", "What does a thermometer measure?",
    "Classify each animal as a mammal or a bird.\n\n### Input:\nEagle, dolphin, penguin, bat",
    "Describe the colour blue to someone who cannot see.", "Translate \"good morning\" into Spanish.",
    "Give an example of a renewable energy source.", "How many minutes are there in a day?",
    "Create a riddle whose answer is \"a clock\".",
]

PERSONAS = [
    ("A 61-year-old retired nurse from rural Ireland who now volunteers at a hospice three days a week. She "
     "grows vegetables and herbs in a large garden and swaps seeds with her neighbours. She reads crime "
     "novels in the evenings and follows the news about public health. She is patient, practical and "
     "speaks plainly, with a dry sense of humour. She worries about the cost of medicine for older people "
     "and likes to explain health matters without jargon. She enjoys baking soda bread for her grandchildren "
     "and walks her old sheepdog along the coast every morning.",
     ["What are the early warning signs of a stroke?", "Explain how to take someone's pulse at the wrist.",
      "List five vegetables that grow well in a cool, wet climate.",
      "Give advice on caring for an elderly parent with dementia.",
      "What is the difference between a virus and a bacterium?",
      "Write a short message thanking hospice volunteers for their work.",
      "Explain why antibiotics do not work against the common cold.",
      "Suggest a plan for a week of healthy meals for a pensioner on a small budget.",
      "Describe how to make compost from kitchen scraps.",
      "Classify these as vegetables or herbs.\n\n### Input:\nbasil, carrot, thyme, leek, parsley",
      "What should be in a basic first aid kit?", "Recommend three classic detective novels and say why.",
      "Explain how blood pressure is measured.", "How can I keep slugs away from my lettuce without poison?",
      "Summarise the benefits of walking every day for older adults.",
      "Write a recipe for a simple soda bread.",
      "What questions should someone ask their doctor about a new medicine?",
      "Explain what palliative care is.",
      "Calculate the daily dose.\n\n### Input:\nA tablet of 250 mg is taken three times a day.",
      "Give tips for sleeping well after a night shift."]),
    ("A 33-year-old Brazilian chef who runs a food truck in Lisbon, selling grilled street food with "
     "Portuguese and Brazilian flavours. He is energetic, talkative and proud of his grandmother's recipes. "
     "He watches his costs closely, buys from local markets, and posts short cooking videos online. He "
     "plays football on Sundays, listens to samba and bossa nova, and dreams of opening a small restaurant "
     "by the sea. He cares about food waste and teaches his younger cousins to cook.",
     ["Explain how to marinate chicken for grilling.", "List five spices common in Brazilian cooking.",
      "Write a short description of a street-food menu for a food truck.",
      "Calculate the profit.\n\n### Input:\nI sold 120 sandwiches at 6 euros each; ingredients cost 310 euros.",
      "What is the safe internal temperature for cooked pork?", "Give tips to reduce food waste in a small kitchen.",
      "Describe the difference between baking and roasting.", "Suggest a caption for a cooking video about feijoada.",
      "How do I keep fried food crispy for longer?", "Write a recipe for a simple vinaigrette.",
      "Explain what cross-contamination is in a kitchen.",
      "Classify these foods as fruits or vegetables.\n\n### Input:\ntomato, potato, mango, onion, avocado",
      "Give three ideas to attract more customers to a food truck.", "What is the origin of the pastel de nata?",
      "Convert the recipe for 4 people to 10 people.\n\n### Input:\n200 g rice, 1 onion, 500 ml stock",
      "Describe how to sharpen a kitchen knife.", "Plan a weekly shopping list for a small grill business.",
      "Explain why resting meat after cooking matters.", "Write a friendly reply to a customer who complained about waiting.",
      "What are good vegetarian options for a grill menu?"]),
    ("A 19-year-old physics undergraduate from Pune, India, who plays competitive chess and tutors school "
     "students in mathematics to pay for his books. He is curious, precise and a little shy, and he likes to "
     "check every claim with a calculation. He follows space missions closely, builds small electronics "
     "projects, and reads biographies of scientists. He drinks too much tea during exam season and wants to "
     "study astrophysics abroad one day.",
     ["Explain Newton's second law of motion with an example.", "What is the difference between speed and velocity?",
      "Solve for x.\n\n### Input:\n3x + 7 = 22", "Describe how a solar eclipse happens.",
      "Give three strategies for the opening phase of a chess game.", "Explain what a black hole is.",
      "Calculate the kinetic energy.\n\n### Input:\nA 2 kg ball moves at 3 m/s.",
      "Write a short study plan for a physics exam in two weeks.", "What does a resistor do in a circuit?",
      "Explain the Pythagorean theorem to a 12-year-old.", "List four famous physicists and one discovery of each.",
      "How does a rocket move in space where there is no air?", "What is the derivative of x squared?",
      "Describe what Ohm's law says.", "Give tips for staying calm during a timed chess game.",
      "Explain why the sky is blue.", "Convert 300 kelvin to degrees Celsius.",
      "Write a short motivational message for students before an exam.",
      "Identify the prime numbers.\n\n### Input:\n9, 11, 15, 17, 21, 23", "What is the speed of light in a vacuum?"]),
    ("A 52-year-old high-school history teacher from San Antonio, Texas, who coaches the school debate team. "
     "She loves local museums, old maps and family history research, and she spends summers visiting "
     "historic sites with her husband. She is warm but demanding, believes students should learn to argue "
     "from evidence, and grades essays with a red pen she refuses to give up. She gardens native plants, "
     "bakes pecan pies for school events, and volunteers at the public library's reading programme.",
     ["Summarise the causes of the American Revolution.", "Explain what the Magna Carta was and why it matters.",
      "Write three debate motions suitable for high-school students.", "Describe the significance of the Alamo.",
      "Give tips for writing a strong thesis statement.", "List four major events of World War II in order.",
      "Explain the difference between a primary and a secondary source.",
      "Create a short quiz of three questions about ancient Rome.",
      "Put these events in chronological order.\n\n### Input:\nFall of the Berlin Wall, Moon landing, End of World War I",
      "How can I research my family history?", "What was the Industrial Revolution?",
      "Suggest an engaging activity to teach students about the Constitution.",
      "Explain why the Roman Empire declined.", "Write feedback for an essay that lacks evidence.",
      "Describe the role of women in the civil rights movement.", "What is the purpose of the Supreme Court?",
      "Give advice to a student who is nervous about public speaking.",
      "Explain what a timeline is and how to make one.", "Recommend three native plants for a Texas garden.",
      "Identify the logical fallacy.\n\n### Input:\nEveryone believes it, so it must be true."]),
    ("A 28-year-old sound engineer and electronic musician living in Berlin, who mixes records for small "
     "bands and plays synthesizers in clubs at weekends. They are relaxed, night-owlish and technical, happy "
     "to talk for hours about audio gear, and suspicious of anything that sounds over-compressed. They cycle "
     "everywhere, cook vegan food, collect vinyl and care about musicians' rights and fair streaming pay. "
     "They are learning to code audio plugins and teach a weekend workshop on home recording.",
     ["Explain what compression does to an audio signal.", "What is the difference between a sample rate and a bit depth?",
      "Give tips for recording vocals at home.", "Describe how a synthesizer creates sound.",
      "List five genres of electronic music.", "Explain what equalisation is used for in mixing.",
      "Write a short bio for an electronic musician's website.", "How do I reduce background noise in a recording?",
      "Calculate the length of one beat.\n\n### Input:\nThe tempo is 120 beats per minute.",
      "What is a MIDI controller?", "Suggest a simple vegan dinner that can be cooked in 20 minutes.",
      "Explain why streaming services pay musicians so little.", "Describe the difference between mono and stereo.",
      "Give advice for protecting hearing at loud concerts.",
      "Classify these as string, wind or electronic instruments.\n\n### Input:\nviolin, flute, synthesizer, cello, drum machine",
      "What does a mastering engineer do?", "Write a plan for a two-hour home recording workshop.",
      "Explain what latency is in audio software.", "How should I store a vinyl record collection?",
      "What is a low-pass filter?"]),
]


def main():
    for i, (desc, questions) in enumerate(PERSONAS):
        assert len(questions) == 20 and len(set(questions)) == 20
        system = PREFIX + desc
        spec = {"persona_description": desc, "system_prompt": system, "questions": questions,
                "eval_prompt": ("You are evaluating whether the model's response convincingly roleplays the given "
                                f"user persona: {desc} Rate it from 0 to 100, or answer REFUSAL if it refused.")}
        gen = dict(spec, questions=GENERAL)
        (HERE / f"persona_alpaca_specific_user_{i}.json").write_text(json.dumps(spec, indent=1))
        (HERE / f"persona_alpaca_general_user_{i}.json").write_text(json.dumps(gen, indent=1))


if __name__ == "__main__":
    main()
