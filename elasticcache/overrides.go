package elasticcache

// Overrides are the fields of a setting that one request changes (the API's
// elastic_cache): a nil field keeps the base Spec's value. Policy and Selection
// are user text, read as ParsePolicy and ParseSelection read them.
type Overrides struct {
	Policy    *string
	Budget    *float64
	Sink      *int
	Distance  *int
	Selection *string
}

// With returns s with o applied and validated, so a request's setting is made
// from the server's Spec without going back to a configuration. Errors are
// *ConfigError naming the field: an unknown policy, then an unknown selection,
// then the first field Validate refuses. The zero Spec reads as full, budget 1.
func (s Spec) With(o Overrides) (Spec, error) {
	c := s.Config()
	if o.Policy != nil {
		p, err := ParsePolicy(*o.Policy)
		if err != nil {
			return Spec{}, err
		}
		c.Policy = p
	}
	if o.Selection != nil {
		sel, err := ParseSelection(*o.Selection)
		if err != nil {
			return Spec{}, err
		}
		c.Selection = sel
	}
	if o.Budget != nil {
		c.Budget = *o.Budget
	}
	if o.Sink != nil {
		c.Sink = *o.Sink
	}
	if o.Distance != nil {
		c.Distance = *o.Distance
	}
	return c.Spec()
}
