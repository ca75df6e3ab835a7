"""What a run and a series leave on disk: every name in their folders (`names`), `RunDir`/`Results` (`rundir`),
`SeriesDir` (`seriesdir`), which members of a series count (`members`) and the checkpoint file format
(`checkpoint`: tensors and plain values only, written atomically, verified before they are trusted)."""
