"""One tree of errors for every splitlm component.

    SplitLMError
     +-- BadMessage        a frame that does not decode or validate (the wire)
     |    +-- FrameTooLarge
     +-- BundleMismatch    a client bundle that does not match what the server serves
     +-- ExportError       a model or an option that export cannot handle
     +-- DataError         a data file that cannot be read (names the file and line)
     +-- StateError        a state file missing, torn or from another run; a resume that cannot be
     +-- AuthError         a credential missing, unreadable, or refused; a TLS setup that cannot work

Each message says what was expected and what arrived.
"""


class SplitLMError(Exception):
    """Base of every error splitlm raises on purpose."""


class BadMessage(SplitLMError):
    """A frame that is not a valid message of this protocol."""


class FrameTooLarge(BadMessage):
    """A frame over the configured size limit."""


class BundleMismatch(SplitLMError):
    """A client's bundle does not match the model, cut or LoRA spec the server serves."""


class ExportError(SplitLMError):
    """export cannot handle this model folder or option."""


class DataError(SplitLMError):
    """A training data file that cannot be read."""


class StateError(SplitLMError):
    """A state file that is missing, unreadable or from another run; or a resume that cannot be."""


class AuthError(SplitLMError):
    """A credential or TLS file that cannot be used, or a server that refused this device."""
