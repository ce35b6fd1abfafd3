package api

import "context"

// PathConsentRefresh drops the daemon's cached consent answers and asks
// again (POST; `cleanwall consent refresh`).
const PathConsentRefresh = "/v1/consent/refresh"

// ConsentRefreshRequest names the sandbox (container ID) whose answers to
// refresh; empty: every sandbox's.
type ConsentRefreshRequest struct {
	Sandbox string `json:"sandbox,omitempty"`
}

// ConsentRefreshResult lists the answers the refresh brought.
type ConsentRefreshResult struct {
	Answers []ConsentAnswer `json:"answers"`
	// ClosedFlows are the flows the denies among them closed.
	ClosedFlows int `json:"closedFlows"`
}

// ConsentAnswer is one answer of the consent service (or a deny standing
// for its failure: Cause says which).
type ConsentAnswer struct {
	Kind       string  `json:"kind"`
	Sandbox    string  `json:"sandbox"`
	Policy     string  `json:"policy"`
	Rule       string  `json:"rule,omitempty"`
	Decision   string  `json:"decision"`
	Reason     string  `json:"reason,omitempty"`
	Cause      string  `json:"cause,omitempty"`
	TTLSeconds float64 `json:"ttlSeconds"`
}

// ConsentRefresh asks the daemon to drop its cached consent answers of a
// sandbox ("" for all) and ask again; it returns once the answers are in
// and the flows the denies cover are closed.
func (c *Client) ConsentRefresh(ctx context.Context, sandbox string) (ConsentRefreshResult, error) {
	var out ConsentRefreshResult
	err := c.do(ctx, "POST", PathConsentRefresh, ConsentRefreshRequest{Sandbox: sandbox}, &out)
	return out, err
}
