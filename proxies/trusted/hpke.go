package trusted

// hpkeRule is a rule's trusted.hpke (served by the HTTP proxy).
type hpkeRule struct{}
