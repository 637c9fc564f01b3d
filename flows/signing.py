"""Signing a registered version's folder with a key, through the OpenSSF `model-signing` library, and checking it.

The manifest (`common/file_manifest.py`) proves that a version's files are the ones registered as long as its
`manifest.sha256` tag is: someone who can both write the artifact store and edit tags could change both. A
signature closes that: with `VITOPS_SIGNING_KEY` (a PEM elliptic-curve private key; `VITOPS_SIGNING_KEY_PASSWORD`
if it is encrypted) set where versions are registered, `vitops register` signs the folder, manifest included,
into `vitops_manifest.sig` (a Sigstore bundle); with `VITOPS_VERIFY_KEY` (the public key) set where versions
are loaded, the registry's loaders, the endpoint and `vitops verify` refuse a version that is unsigned or whose
signature does not verify. Neither set: nothing is signed or asked for.

    openssl ecparam -name prime256v1 -genkey -noout -out signing-key.pem
    openssl ec -in signing-key.pem -pubout -out verify-key.pem
"""

from __future__ import annotations

import os
from pathlib import Path

from vitops.common.file_manifest import SIGNATURE_FILE

SIGN_KEY_ENV, SIGN_PASSWORD_ENV, VERIFY_KEY_ENV = (
    "VITOPS_SIGNING_KEY",
    "VITOPS_SIGNING_KEY_PASSWORD",
    "VITOPS_VERIFY_KEY",
)
# Written into a downloaded copy by MLflow and by Python's imports of the shipped code: not part of the version.
_IGNORED = ("registered_model_meta", "code/__pycache__", "__pycache__", SIGNATURE_FILE)


class SignatureError(RuntimeError):
    """A version that is unsigned where a signature is asked for, or whose signature does not verify."""


def sign_folder(folder: Path) -> str | None:
    """Sign `folder` with `VITOPS_SIGNING_KEY` into its `vitops_manifest.sig`; the key's name, or None unset.

    Raises:
        SignatureError: the key cannot be read or used.
    """
    key = os.environ.get(SIGN_KEY_ENV, "").strip()
    if not key:
        return None
    import model_signing

    try:
        config = model_signing.signing.Config().use_elliptic_key_signer(
            private_key=key, password=os.environ.get(SIGN_PASSWORD_ENV) or None
        )
        config.set_hashing_config(_hashing()).sign(Path(folder), Path(folder) / SIGNATURE_FILE)
    except Exception as err:  # noqa: BLE001 - the library raises many types for a bad key
        raise SignatureError(f"cannot sign with {SIGN_KEY_ENV}={key}: {type(err).__name__}: {err}") from err
    return Path(key).name


def verify_folder(folder: Path) -> bool:
    """Check `folder`'s signature against `VITOPS_VERIFY_KEY`; False when no key is set (nothing asked).

    Raises:
        SignatureError: a key is set and the folder is unsigned, or its signature does not verify.
    """
    key = os.environ.get(VERIFY_KEY_ENV, "").strip()
    if not key:
        return False
    signature = Path(folder) / SIGNATURE_FILE
    if not signature.is_file():
        raise SignatureError(
            f"{SIGNATURE_FILE}: the version is unsigned, and {VERIFY_KEY_ENV} asks for versions signed with its "
            "key: register it where VITOPS_SIGNING_KEY is set"
        )
    import model_signing

    try:
        config = model_signing.verifying.Config().use_elliptic_key_verifier(public_key=key)
        config.set_hashing_config(_hashing()).verify(Path(folder), signature)
    except Exception as err:  # noqa: BLE001 - a failed verification and a bad key alike
        raise SignatureError(f"{SIGNATURE_FILE}: does not verify with {VERIFY_KEY_ENV}={key}: {err}") from None
    return True


def _hashing():  # noqa: ANN202 - model_signing.hashing.Config
    import model_signing

    return model_signing.hashing.Config().set_ignored_paths(paths=list(_IGNORED), ignore_git_paths=True)
