"""An importance strategy: a supervised token's importance is the length of its text in characters."""

import numpy as np
import pyarrow as pa

from sftgo.core.shards import importance_column, list_column


class TokenLength:
    name = "toklen"  # the shards get importance_toklen and group_toklen

    def params(self, cfg) -> dict:  # what determines the scores (recorded in the manifest)
        return {"unit": "characters"}

    def stage(self, cols: dict, cfg, tokenizer: str) -> dict:  # pass 1, one partition: score every token
        scores = [
            np.where(mask == 1, offsets[:, 1] - offsets[:, 0], 0).astype(np.float32)
            for mask, offsets in zip(cols["loss_mask"], cols["offsets"])
        ]
        return {importance_column(self.name): list_column(scores, pa.float32())}

    def importance(self, staged: pa.Table, artifacts: dict, folder: str) -> pa.ListArray:  # pass 2
        return staged[importance_column(self.name)].combine_chunks()


STRATEGY = TokenLength()
