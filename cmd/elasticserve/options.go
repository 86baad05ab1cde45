package main

import (
	"fmt"

	"github.com/elasticserve/elasticserve/api"
	"github.com/elasticserve/elasticserve/config"
)

// apiOptions is what the HTTP layer gets from the configuration: api knows
// nothing of config, so this is where an option the API needs is passed on.
// The cache setting arrives as the Spec config validated at Load; an error
// here means cfg did not come from config.Load.
func apiOptions(cfg *config.Config) (api.Options, error) {
	cache, err := cfg.Cache()
	if err != nil {
		return api.Options{}, fmt.Errorf("config: elastic cache: %w", err)
	}
	return api.Options{
		ModelAlias:            cfg.ModelAlias,
		APIKey:                cfg.APIKey,
		CORSOrigins:           cfg.CORSOriginList(),
		MaxBodyBytes:          int64(cfg.MaxBodyBytes),
		MaxImageBytes:         int64(cfg.MaxImageBytes),
		MaxImages:             cfg.MaxImages,
		MaxImagePixels:        cfg.MaxImagePixels,
		AllowImageURLs:        cfg.AllowImageURLs,
		AllowPrivateImageURLs: cfg.AllowPrivateImageURLs,
		ImageURLTimeout:       cfg.ImageURLTimeout,
		RequestTimeout:        cfg.RequestTimeout,
		DefaultMaxTokens:      max(cfg.MaxTokensDefault, 0),
		Cache:                 cache,
		UI:                    cfg.UI,
	}, nil
}
