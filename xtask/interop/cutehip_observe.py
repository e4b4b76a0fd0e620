"""Runs cutehip's daemon (cutehipd.py in the current directory) unchanged, and reports
each ESP SA it installs as one JSON line in the file named by $HIP_INTEROP_SA_LOG: its
database key, SPI and the SHA-256 fingerprints (first 8 octets, hex) of its keys.

hip's `hip-agent hip connect|listen` print the same fingerprints, so `cargo xtask
interop` compares both ends' ESP keys without either side printing a key. This is
hip's own instrumentation (it observes cutehip's SA database from outside); it does
not change what cutehip does.
"""

import builtins
import hashlib
import json
import os
import runpy
import sys

sys.path.insert(0, os.getcwd())


def _fingerprint(key):
    return hashlib.sha256(bytes(key)).hexdigest()[:16]


def _observe(sa):
    add_record = sa.SecurityAssociationDatabase.add_record

    def observed(self, source, destination, record):
        with open(os.environ["HIP_INTEROP_SA_LOG"], "a") as f:
            f.write(
                json.dumps(
                    {
                        "source": source,
                        "destination": destination,
                        "spi": record.get_spi(),
                        "enc_sha256": _fingerprint(record.get_aes_key()),
                        "auth_sha256": _fingerprint(record.get_hmac_key()),
                    }
                )
                + "\n"
            )
        return add_record(self, source, destination, record)

    sa.SecurityAssociationDatabase.add_record = observed


# cutehip's modules import each other in an order that only works from cutehipd.py's
# own import sequence, so its SA module is wrapped once cutehipd.py has imported it
# (fully: a module is in sys.modules while it is still being initialized).
_import = builtins.__import__


def _hooked_import(name, *args, **kwargs):
    module = _import(name, *args, **kwargs)
    sa = sys.modules.get("databases.SA")
    if (
        sa is not None
        and hasattr(sa, "SecurityAssociationDatabase")
        and not getattr(sa, "_hip_interop_observed", False)
    ):
        sa._hip_interop_observed = True
        _observe(sa)
    return module


builtins.__import__ = _hooked_import
runpy.run_path("cutehipd.py", run_name="__main__")
