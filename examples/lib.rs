//! Examples only: see the `[[example]]` targets of this package and `README.md` beside it.
