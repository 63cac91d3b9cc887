"""The embedded default data: a seeded fictional product catalogue and support desk.

``catalog`` draws the facts, ``documents`` writes them down, ``tasks`` asks about them
(questions, tickets, training examples), ``pretraining`` builds the base model's text
and ``generate`` writes a whole world to a folder.
"""
