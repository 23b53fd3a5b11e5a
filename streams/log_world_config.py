"""The knobs of the log world (:mod:`streams.log_world`): size, shape and the hidden truth.

Why apart: the config is what a caller sets and the CLI's typed flags read (each field's
``help``); the world that draws from it is a few hundred lines of sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GENRES = ("Drama", "Comedy", "Action", "Thriller", "Romance", "Adventure", "Crime", "Sci-Fi",
          "Horror", "Fantasy", "Children", "Animation", "Mystery", "Documentary", "Musical", "War",
          "Western", "Film-Noir")
OCCUPATIONS = ("student", "other", "educator", "engineer", "programmer", "executive",
               "administrator", "writer", "technician", "artist", "librarian", "entertainment",
               "marketing", "scientist", "healthcare", "retired", "salesman", "lawyer", "homemaker",
               "doctor", "none")


@dataclass
class LogWorldConfig:
    """Size, shape and hidden-truth parameters of a rating-like log (``generate_log``)."""

    seed: int = field(default=0, metadata={"help": "random seed: same seed and config, same log"})
    users: int = field(default=2_000, metadata={"help": "number of users"})
    items: int = field(default=3_000, metadata={"help": "number of items"})
    rows: int = field(default=200_000, metadata={"help": "rows (events) in the log"})
    dim: int = field(default=8, metadata={"help": "latent dimension of the user x item taste"})
    genres: int = field(default=len(GENRES), metadata={
        "help": "distinct genre tags (multi-valued item column 'genres')"})
    brands: int = field(default=40, metadata={"help": "distinct brands (string item column 'brand')"})
    string_ids: bool = field(default=True, metadata={
        "help": "user/item ids as strings ('u12', 'i345'); false: integers"})
    item_zipf_a: float = field(default=1.2, metadata={
        "help": "Zipf exponent of item popularity: weight of rank r is (r + offset)^-a"})
    item_zipf_offset: float = field(default=0.013, metadata={
        "help": "Zipf-Mandelbrot offset as a share of items (flattens the head, as on real logs)"})
    activity_depth: float = field(default=0.1, metadata={
        "help": "heavy users reach deeper into the tail: a user's exponent is "
                "a * (events / median events)^-depth"})
    user_activity_sigma: float = field(default=1.1, metadata={
        "help": "lognormal sigma of events per user (heavy-tailed activity)"})
    min_user_events: int = field(default=5, metadata={"help": "fewest events of a user"})
    base_logit: float = field(default=-0.35, metadata={"help": "base logit (sets the label rate)"})
    user_bias_std: float = field(default=1.1, metadata={"help": "logit std of per-user base rates"})
    item_bias_std: float = field(default=1.0, metadata={"help": "logit std of per-item base rates"})
    taste_std: float = field(default=0.7, metadata={"help": "logit std of the user x item taste term"})
    user_attr_share: float = field(default=0.25, metadata={
        "help": "share of user bias and taste variance explained by gender, age, occupation"})
    item_attr_share: float = field(default=0.8, metadata={
        "help": "share of item bias and taste variance explained by brand, genres, year"})
    choice_strength: float = field(default=0.0, metadata={
        "help": "users pick what they expect to like: selection strength on taste + item rate"})
    pop_quality_corr: float = field(default=0.3, metadata={
        "help": "correlation of item popularity rank with item base rate"})
    item_drift_std: float = field(default=0.3, metadata={
        "help": "logit amplitude of slow per-item base-rate drift over the log's span"})
    user_drift_std: float = field(default=0.7, metadata={
        "help": "logit std of a user's base rate wandering over their own history"})
    user_drift_events: float = field(default=30.0, metadata={
        "help": "correlation length, in the user's own events, of that wandering (AR(1))"})
    taste_drift: float = field(default=1.0, metadata={
        "help": "radians a user's personal taste rotates over the log's span"})
    new_item_fraction: float = field(default=0.3, metadata={
        "help": "share of items released during the log (the rest exist at its start)"})
    start_ts: int = field(default=1_420_070_400, metadata={"help": "epoch seconds of the log's start"})
    span_days: float = field(default=730.0, metadata={"help": "event-time span of the log in days"})
    user_window_days: float = field(default=7.0, metadata={
        "help": "median days between a user's first and last event (lognormal, bursty users)"})
    year_missing: float = field(default=0.1, metadata={"help": "share of items with an empty year"})
    age_missing: float = field(default=0.15, metadata={"help": "share of users with an empty age"})
    gender_missing: float = field(default=0.02, metadata={"help": "share of users with an empty gender"})
    genres_missing: float = field(default=0.01, metadata={"help": "share of items with no genres"})

    def validate(self) -> None:
        if min(self.users, self.items, self.rows, self.dim, self.genres, self.brands) <= 0:
            raise ValueError("users, items, rows, dim, genres and brands must be positive")
        if self.min_user_events < 1 or self.span_days <= 0 or self.user_window_days <= 0:
            raise ValueError("min_user_events must be >= 1, span_days and user_window_days > 0")
        if min(self.user_bias_std, self.item_bias_std, self.taste_std, self.item_drift_std,
               self.user_activity_sigma, self.user_drift_std, self.item_zipf_a, self.item_zipf_offset,
               self.activity_depth, self.taste_drift) < 0:
            raise ValueError("stds, sigma, zipf exponent and drift must be >= 0")
        shares = (self.user_attr_share, self.item_attr_share, self.new_item_fraction,
                  self.year_missing, self.age_missing, self.gender_missing, self.genres_missing)
        if not all(0.0 <= s <= 1.0 for s in shares) or not -1.0 <= self.pop_quality_corr <= 1.0:
            raise ValueError("shares and missing rates must lie in [0, 1], pop_quality_corr in [-1, 1]")
