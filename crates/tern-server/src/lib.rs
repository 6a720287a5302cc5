//! The HTTP face of tern: an OpenAI-compatible server over the library engine. Not built yet (see the serve issue).
