//! Alki agent library.
