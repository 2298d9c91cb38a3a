"""Putting a trained model to work: a saved, searchable index of a folder's images.

``Gallery`` (gallery.py) builds, grows, searches, identifies and verifies; ``items.py`` lists
what is indexed; ``reading.py`` embeds files in batches; ``store.py`` writes and checks the
gallery folder (index.faiss, embeddings.npy, items.csv, gallery.json, bad_files.txt).
"""

from __future__ import annotations

from siamese.gallery.gallery import IDENTIFY_BY, Gallery, Identity, Neighbour
from siamese.gallery.items import Item

__all__ = ["IDENTIFY_BY", "Gallery", "Identity", "Item", "Neighbour"]
