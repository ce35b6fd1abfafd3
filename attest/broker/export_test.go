package broker

// UsedSessions is the size of the set of used sessions.
func (s *Server) UsedSessions() int { return s.challenges.usedCount() }
