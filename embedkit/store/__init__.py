"""The HDF5 store: one main file that every stage reads and writes, with its big arrays in shards beside it.

Layout and guarantees are in docs/store.md. This package is the only place in embedkit that opens h5py:

* :mod:`.schema` — versions, key names, configuration fingerprints, the checks that refuse bad files;
* :mod:`.lock` — one writer per store;
* :mod:`.shards` — immutable, checksummed shard files and the reader that stitches them;
* :mod:`.commit` — atomic, verified changes to the main file;
* :mod:`.rows` — items and embedding keys inside a commit;
* :mod:`.runs` — the resumable run (shards as progress) that embed, segment and patches share;
* :mod:`.writing` — the store's write operations; :mod:`.reading` — :class:`Store`;
* :mod:`.tools` — check, pack and upgrade.
"""

from .commit import transaction
from .lock import holds_lock, write_lock
from .reading import FANCY_READ_LIMIT, Store
from .rows import ensure_embedding, write_items
from .runs import Run
from .schema import (COMPARED_FIELDS, ITEM_FIELDS, SCHEMA_VERSION, STR, check_schema, comparable_config,
                     config_mismatch_message, fingerprint, key_for, now_iso, validate_key)
from .shards import folder_of

__all__ = ["COMPARED_FIELDS", "FANCY_READ_LIMIT", "ITEM_FIELDS", "SCHEMA_VERSION", "STR", "Run", "Store", "check_schema",
           "comparable_config", "config_mismatch_message", "ensure_embedding", "fingerprint", "folder_of", "holds_lock",
           "key_for", "now_iso", "transaction", "validate_key", "write_items", "write_lock"]
