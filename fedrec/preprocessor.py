"""The model's data preprocessor: the ``model.preproc`` config section as an object.

The trainer receives it as ``model_preproc`` (the tutorial's name): it knows where the raw
Criteo file is, how to turn it into memory-mapped arrays, and how to open them again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from fedrec.utilities import registry


@registry.load("preproc", "dlrm")
class DLRMPreprocessor:
    """Preprocessing options for Criteo-format data (``model.preproc`` in the config)."""

    def __init__(
        self,
        datafile: str = "data/criteo/train.txt",
        output_file: str = "data/criteo/processed",
        max_ind_range: int = -1,
        hash_table_size: str = "occurring",
        threshold: int = 0,
        dataset_config: Optional[Dict[str, Any]] = None,
        split: str = "auto",
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        skip_bad_lines: bool = False,
        users_file: Optional[str] = None,
        config_path: Optional[str] = None,
    ) -> None:
        self.datafile = datafile
        self.output_file = output_file
        self.max_ind_range = max_ind_range
        self.hash_table_size = hash_table_size
        self.threshold = threshold
        self.dataset_config = dict(dataset_config or {"name": "kaggle"})
        self.split = split
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.skip_bad_lines = skip_bad_lines
        self.users_file = users_file
        self.config_path = config_path
        self._dataset = None

    @classmethod
    def from_config(cls, model_config: Dict[str, Any], config_path: Optional[str] = None) -> "DLRMPreprocessor":
        section = dict(model_config.get("preproc") or {})
        section.pop("name", None)
        return registry.instantiate(cls, section, kind="model.preproc", config_path=config_path)

    def preprocess_data(self, progress: bool = True) -> Dict[str, Any]:
        """Stream ``datafile`` into ``output_file``; returns the metadata written.

        Option errors name the config key (``model.preproc.val_fraction``) before any work.
        """
        from fedrec.data.criteo import check_options, preprocess

        options = dict(
            max_ind_range=self.max_ind_range,
            hash_table_size=self.hash_table_size,
            threshold=self.threshold,
            dataset_config=self.dataset_config,
            split=self.split,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
        )
        where = f"{self.config_path}: " if self.config_path else ""
        check_options(prefix="model.preproc.", where=where, **options)
        return preprocess(
            self.datafile,
            self.output_file,
            skip_bad_lines=self.skip_bad_lines,
            users_file=self.users_file,
            progress=progress,
            **options,
        )

    def load(self):
        """The processed dataset (memory-mapped); a clear error says how to make it."""
        if self._dataset is None:
            from fedrec.data import DataError, ProcessedDataset
            from fedrec.data.processed import PREPROCESS_HINT

            try:
                self._dataset = ProcessedDataset.open(self.output_file)
            except DataError as err:  # one line, with the command for this config
                config = self.config_path or "<your config>"
                hint = (f"run `fedrec preprocess --config {config}` (reads {self.datafile}, "
                        f"writes {Path(self.output_file)})")
                message = str(err)
                if PREPROCESS_HINT in message:
                    raise DataError(message.replace(PREPROCESS_HINT, hint)) from None
                raise DataError(f"{message}; {hint}") from None
        return self._dataset


@registry.load("preproc", "movielens")
class MovieLensPreprocessor:
    """MovieLens ratings (``model.preproc: {name: movielens, ...}``): see fedrec.data.movielens."""

    def __init__(self, datafile: str = "../shared/data/movielens/ml-latest-small/ratings.csv",
                 output_file: str = "data/movielens/processed", config_path: Optional[str] = None,
                 **options: Any) -> None:
        from fedrec.data.movielens import MovieLensOptions

        self.datafile = datafile
        self.output_file = output_file
        self.config_path = config_path
        self.options = registry.validate_model(MovieLensOptions, options, "model.preproc")
        self._dataset = None

    @classmethod
    def from_config(cls, model_config: Dict[str, Any], config_path: Optional[str] = None) -> "MovieLensPreprocessor":
        section = dict(model_config.get("preproc") or {})
        section.pop("name", None)
        return cls(config_path=config_path, **section)

    def preprocess_data(self, progress: bool = True) -> Dict[str, Any]:
        from fedrec.data.movielens import preprocess_ratings

        return preprocess_ratings(self.datafile, self.output_file, self.options)

    def describe(self, metadata: Dict[str, Any]) -> List[str]:
        from fedrec.data.movielens import describe_report

        return [f"preprocessed {self.datafile} -> {self.output_file}", *describe_report(metadata)]

    def fl_defaults(self) -> Dict[str, Any]:
        """Every user is a client: ``fl.num_workers`` defaults to the number of users."""
        return {"num_workers": self.load().num_users}

    def load(self):
        if self._dataset is None:
            from fedrec.data.errors import DataError
            from fedrec.data.movielens import PREPROCESS_HINT, RatingsDataset

            try:
                self._dataset = RatingsDataset.open(self.output_file)
            except DataError as err:
                hint = (f"run `fedrec preprocess --config {self.config_path or '<your config>'}` "
                        f"(reads {self.datafile}, writes {Path(self.output_file)})")
                raise DataError(str(err).replace(PREPROCESS_HINT, hint)) from None
        return self._dataset
